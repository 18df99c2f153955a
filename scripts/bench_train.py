#!/usr/bin/env python
"""Whole training steps with EL vs cross-entropy: fairseq words/s, timm images/s.

fairseq: stock ``fairseq-train`` on a small IWSLT14 De-En slice (built with
``scripts/make_iwslt14_sample.py`` if ``--data-bin`` is not given), once with
``label_smoothed_cross_entropy`` and once with
``encouraging_label_smoothed_cross_entropy``, runs interleaved, words/s read
from fairseq's own log (the ``train_inner`` lines after the first).

Also: the model's forward + criterion + backward on the same real batches in
one process, the criteria interleaved, which is far less noisy than separate
CLI runs (``fairseq steps``; on CUDA a 3 + 3-layer IWSLT Transformer in
float16, as ``--fp16`` runs it; EL also with ``--el-fused-projection``).

timm: a timm model trained on random images, with timm's
``LabelSmoothingCrossEntropy`` vs ``timm.loss.create_classification_loss('encouraging')``,
images/s over timed steps after warm-up, runs interleaved.

Each figure is the median over ``--repeats`` runs; the ratio EL / CE is taken
between runs of the same process and machine. Writes JSON with ``--json``.

On CUDA (``--device cuda``): timm defaults to ``resnet50``, batch 128, 224 px,
in float32 and with AMP (``--timm-precision fp32 amp``), 30 timed steps; the
fairseq CLI runs with ``--fp16``, once per criterion by default
(``--cli-repeats``: on a GPU the tiny CLI model measures start-up more than the
loss; the ``fairseq steps`` rows are the figures to read), and also times EL with
``--el-fused-projection`` (``el_proj``).

    python scripts/bench_train.py --which fairseq timm --repeats 3 --json bench-train.json
    python scripts/bench_train.py --device cuda --which timm fairseq --data-bin DATA_BIN
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not pip-installed (e.g. a GPU machine)
    sys.path.insert(0, str(ROOT))
#: stock fairseq-train, through its module so that a fairseq on PYTHONPATH (no console scripts) works too
FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]

TINY = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def summarize(res: dict, unit: str) -> dict:
    """Medians of interleaved runs ``{"ce": [...], "el": [...], ...}`` and their
    ratios to CE (``el_proj`` too when timed)."""
    ce, el = statistics.median(res["ce"]), statistics.median(res["el"])
    out = {"unit": unit, "ce": ce, "el": el, "ratio": el / ce, "runs": res}
    if "el_proj" in res:
        out["el_proj"] = statistics.median(res["el_proj"])
        out["el_proj_ratio"] = out["el_proj"] / ce
    return out


def fairseq_wps(data_bin: Path, criterion_args, updates: int, device_args, log_interval: int) -> float:
    with tempfile.TemporaryDirectory() as save:
        cmd = [
            *FAIRSEQ_TRAIN, str(data_bin), "--user-dir", str(ROOT / "fairseq_el"), *TINY,
            "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "4000", "--max-update", str(updates),
            "--disable-validation", "--no-save", "--save-dir", save, "--seed", "1", "--num-workers", "0",
            "--log-format", "simple", "--log-interval", str(log_interval), "--label-smoothing", "0.1",
            *criterion_args, *device_args,
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"fairseq-train failed:\n{out[-3000:]}")
    wps = [float(x) for x in re.findall(r"train_inner \|.* wps=([\d.]+)", out)]
    if len(wps) < 2:
        raise SystemExit(f"too few train_inner lines ({len(wps)}); raise --updates\n{out[-2000:]}")
    return statistics.mean(wps[1:])  # the first interval includes start-up


#: the model of the in-process CUDA steps: the IWSLT architecture at full width, 3 + 3 layers
CUDA_ARCH = ["--arch", "transformer_iwslt_de_en", "--share-all-embeddings", "--encoder-layers", "3",
             "--decoder-layers", "3"]


def fairseq_steps(data_bin: Path, repeats: int, device: str = "cpu", n_batches: int = 12) -> dict:
    """Model forward + criterion + backward on the same real batches, in one
    process, the criteria interleaved: less noise than separate CLI runs; EL
    also with ``--el-fused-projection`` (``el_proj``). On CUDA the model is in
    float16 as under ``--fp16``."""
    import logging

    import torch
    from fairseq import options, tasks, utils
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    logging.getLogger("filelock").setLevel(logging.WARNING)  # inductor's cache locks, at DEBUG under fairseq

    import fairseq_el  # noqa: F401
    from fairseq_el.criterion import EncouragingLabelSmoothedCrossEntropyCriterion

    cuda = device == "cuda"
    arch = CUDA_ARCH if cuda else [*TINY, "--cpu"]
    cfg = options.parse_args_and_arch(options.get_training_parser(), [str(data_bin), *arch])
    task = tasks.setup_task(cfg)
    task.load_dataset("train")
    torch.manual_seed(1)
    model = task.build_model(cfg)
    if cuda:
        model = model.half().cuda()
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=4096).next_epoch_itr(shuffle=False)
    batches = [utils.move_to_cuda(b) if cuda else b for _, b in zip(range(n_batches), itr)]
    words = sum(int(b["ntokens"]) for b in batches)
    crits = {
        "ce": LabelSmoothedCrossEntropyCriterion(task, False, 0.1),
        "el": EncouragingLabelSmoothedCrossEntropyCriterion(task, False, 0.1, log_end=0.5),
        "el_proj": EncouragingLabelSmoothedCrossEntropyCriterion(task, False, 0.1, log_end=0.5,
                                                                 el_fused_projection=True),
    }

    def run(crit) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            model.zero_grad(set_to_none=True)
            crit(model, b)[0].backward()
        if cuda:
            torch.cuda.synchronize()
        return words / (time.perf_counter() - t0)

    for crit in crits.values():  # warm-up (and compilation)
        run(crit)
    res = {k: [] for k in crits}
    for r in range(repeats):
        for name, crit in crits.items():
            res[name].append(run(crit))
        print(f"  fairseq steps run {r + 1}/{repeats}: "
              + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()) + " words/s", flush=True)
    return summarize(res, "words/s")


def bench_fairseq(args) -> dict:
    data_bin = args.data_bin
    if data_bin is None:
        tmp = Path(tempfile.mkdtemp(prefix="el-bench-"))
        print(f"building an IWSLT14 slice in {tmp} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_iwslt14_sample.py"), "--data", str(args.iwslt14),
                        "--out", str(tmp / "sample"), "--train", "4000", "--valid", "100", "--test", "100"],
                       check=True, capture_output=True)
        data_bin = tmp / "sample" / "bin"
    device = ["--fp16"] if args.device == "cuda" else ["--cpu"]
    el = ["--criterion", "encouraging_label_smoothed_cross_entropy", "--log-end", "0.5"]
    runs = {"ce": ["--criterion", "label_smoothed_cross_entropy"], "el": el}
    if args.device == "cuda":
        runs["el_proj"] = el + ["--el-fused-projection"]
    res = {k: [] for k in runs}
    for r in range(args.cli_repeats):
        for name, crit in runs.items():
            wps = fairseq_wps(data_bin, crit, args.updates, device, max(args.updates // 5, 1))
            res[name].append(wps)
            print(f"  fairseq run {r + 1}/{args.cli_repeats} {name}: {wps:.0f} words/s", flush=True)
    out = summarize(res, "words/s")
    out["steps"] = fairseq_steps(data_bin, args.step_repeats, args.device, args.step_batches)
    return out


def bench_timm(args) -> dict:
    """One result per precision in ``--timm-precision``."""
    return {prec: bench_timm_precision(args, prec) for prec in args.timm_precision}


def bench_timm_precision(args, precision: str) -> dict:
    import contextlib

    import timm
    import timm.loss
    import torch

    import timm_el  # noqa: F401 -- hooks timm.loss.create_classification_loss: look it up after this import

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    losses = {
        "ce": timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1),
        "el": timm.loss.create_classification_loss(loss_type="encouraging", smoothing=0.1, log_end=0.75),
    }

    def run(loss_fn) -> float:
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=args.num_classes, pretrained=False).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        amp = precision == "amp"
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16) \
                if amp else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch / (time.perf_counter() - t0)

    res = {k: [] for k in losses}
    for r in range(args.repeats):
        for name, fn in losses.items():
            ips = run(fn)
            res[name].append(ips)
            print(f"  timm {precision} run {r + 1}/{args.repeats} {name}: {ips:.1f} images/s", flush=True)
    return {"precision": precision, "model": args.model, "batch": args.batch, "img_size": args.img_size,
            "num_classes": args.num_classes, **summarize(res, "images/s")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--which", nargs="+", choices=["fairseq", "timm"], default=["fairseq", "timm"])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per loss (median is reported)")
    ap.add_argument("--cli-repeats", type=int, default=None,
                    help="fairseq-train runs per criterion (default: --repeats on CPU, 1 on CUDA)")
    ap.add_argument("--updates", type=int, default=60, help="fairseq updates per run")
    ap.add_argument("--step-repeats", type=int, default=5, help="interleaved runs of the fairseq model steps")
    ap.add_argument("--step-batches", type=int, default=12, help="batches per run of the fairseq model steps")
    ap.add_argument("--data-bin", type=Path, help="binarized fairseq data (default: build an IWSLT14 slice)")
    ap.add_argument("--iwslt14", type=Path, default=ROOT.parent / "shared" / "data" / "iwslt14-de-en",
                    help="IWSLT14 text used to build the slice")
    ap.add_argument("--model", default=None, help="timm model name (default: resnet18 on CPU, resnet50 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    ap.add_argument("--img-size", type=int, default=None, help="default: 64 on CPU, 224 on CUDA")
    ap.add_argument("--timm-precision", nargs="+", choices=["fp32", "amp"], default=None,
                    help="default: fp32 on CPU, fp32 and amp on CUDA")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed timm steps per run (default: 10 on CPU, 30 on CUDA)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    for flag in ("repeats", "cli_repeats", "steps", "step_repeats", "step_batches", "updates"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    args.model = args.model or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (128 if cuda else 32)
    args.img_size = args.img_size or (224 if cuda else 64)
    args.timm_precision = args.timm_precision or (["fp32", "amp"] if cuda else ["fp32"])
    args.steps = args.steps or (30 if cuda else 10)
    args.cli_repeats = args.cli_repeats or (1 if cuda else args.repeats)
    if args.json and args.json.exists():
        ap.error(f"--json {args.json} exists; remove it or choose another path")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for which in args.which:
        print(f"{which}:", flush=True)
        results[which] = bench_fairseq(args) if which == "fairseq" else bench_timm(args)
    print()
    print(f"{'benchmark':<20} {'unit':<9} {'CE':>10} {'EL':>10} {'EL/CE':>7}")
    for which in args.which:
        if which == "timm":
            rows = [(f"timm {prec}", r) for prec, r in results[which].items()]
        else:
            rows = [(which, results[which])]
            if "steps" in results[which]:
                rows.append((f"{which} steps", results[which]["steps"]))
        for label, r in rows:
            print(f"{label:<20} {r['unit']:<9} {r['ce']:>10.1f} {r['el']:>10.1f} {r['ratio']:>7.3f}")
            if "el_proj" in r:  # EL with --el-fused-projection
                print(f"{label + ' proj':<20} {r['unit']:<9} {r['ce']:>10.1f} {r['el_proj']:>10.1f} "
                      f"{r['el_proj_ratio']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
