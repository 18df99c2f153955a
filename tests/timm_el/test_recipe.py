"""timm_el.recipe: the decisions of the image recipes (presets, flags, batch, skip / resume, torchrun).

The shell scripts around it are tested end to end in test_image_recipes.py.
"""
import argparse
import json
import shlex
import sys

import pytest

import timm_el.train
from timm_el import recipe
from timm_el.recipe import (
    PRESETS,
    RecipeError,
    flag_groups,
    launch_command,
    merge_flags,
    per_process_batch,
    run_state,
    train_arguments,
)

from confined import READ_ONLY, one_error_line, run_confined
from helpers import PY, ROOT, command_env


@pytest.fixture(scope="module")
def parser():
    return timm_el.train.build_parser()


def args_for(preset, parser, **kw):
    base = dict(work="/w", loss="el", seed=1, data="/data", dataset=None, model=None, download=False,
                log_end=None, world=1, parser=parser)
    base.update(kw)
    return train_arguments(preset, **base)


def value(args, flag, n=1):
    i = len(args) - 1 - args[::-1].index(flag)  # the last occurrence wins in argparse
    return args[i + 1] if n == 1 else args[i + 1:i + 1 + n]


# EL_SPEC section 4, as written there
SPEC_EFFNET = ("--model efficientnet_b0 -b 384 --sched step --epochs 450 --decay-epochs 2.4 --decay-rate .97 "
               "--opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.2 "
               "--drop-connect 0.2 --model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel "
               "--reprob 0.2 --amp --lr .048")


def test_presets_are_the_papers(parser):
    # EfficientNet-B0: every flag of the spec, with -b 384 on each of the paper's 2 GPUs
    args = args_for("imagenet_efficientnet_b0", parser, world=2)
    spec = dict((d, g) for d, g in flag_groups(shlex.split(SPEC_EFFNET), parser))
    got = dict((d, g) for d, g in flag_groups(args, parser))
    for dest, group in spec.items():
        assert got[dest][1:] == group[1:], dest
    # ResNet-50: SGD (no nesterov) 0.1, momentum 0.9, wd 1e-4, 256 a step, 90 epochs, x0.1 every 30
    args = args_for("imagenet_resnet50", parser, world=2)
    assert [value(args, f) for f in ("--opt", "--lr", "--momentum", "--weight-decay", "--epochs", "--sched",
                                     "--decay-epochs", "--decay-rate", "-b", "--warmup-epochs", "--smoothing")] == \
        ["momentum", "0.1", "0.9", "1e-4", "90", "step", "30", "0.1", "128", "0", "0"]
    # CIFAR: 224 px, SGD 0.0125 nesterov, momentum 0.9, wd 1e-4, batch 32, 90 epochs, 30/60/80 x0.1
    args = args_for("cifar", parser)
    assert [value(args, f) for f in ("--img-size", "--opt", "--lr", "--momentum", "--weight-decay", "-b", "--epochs",
                                     "--sched", "--decay-rate")] == \
        ["224", "nesterov", "0.0125", "0.9", "1e-4", "32", "90", "multistep", "0.1"]
    assert value(args, "--decay-milestones", 3) == ["30", "60", "80"]
    # MNIST: mnist_cnn, SGD 0.1, momentum 0.9, wd 5e-4, batch 256, 100 epochs
    args = args_for("mnist", parser)
    assert [value(args, f) for f in ("--model", "--opt", "--lr", "--momentum", "--weight-decay", "-b", "--epochs")] == \
        ["mnist_cnn", "momentum", "0.1", "0.9", "5e-4", "256", "100"]
    assert "--no-aug" in args
    # every preset parses and passes the CLI's own checks
    for name in PRESETS:
        for loss in ("ce", "el"):
            cli = timm_el.train.build_parser().parse_args(args_for(name, parser, loss=loss))
            assert cli.loss == {"ce": "ce", "el": "encouraging"}[loss]
            assert cli.log_end == (0.75 if loss == "el" else None)


@pytest.mark.parametrize("preset, kw, task, extra", [
    ("imagenet_resnet50", {}, "imagenet_resnet50", []),
    ("imagenet_efficientnet_b0", {"dataset": "hfds/imagenet-1k"}, "imagenet_efficientnet_b0",
     ["--dataset", "hfds/imagenet-1k"]),
    ("cifar", {}, "cifar10_resnet50", ["--dataset", "torch/cifar10", "--num-classes", "10"]),
    ("cifar", {"dataset": "torch/cifar100", "model": "efficientnet_b0", "download": True},
     "cifar100_efficientnet_b0", ["--dataset", "torch/cifar100", "--dataset-download", "--num-classes", "100"]),
    ("mnist", {}, "mnist", []),
    ("mnist", {"dataset": "torch/mnist"}, "mnist", ["--dataset", "torch/mnist"]),
])
def test_run_arguments(parser, preset, kw, task, extra):
    args = args_for(preset, parser, seed=3, **kw)
    assert args[:2] == ["--data-dir", "/data"]
    assert value(args, "--task-name") == task and value(args, "--seed") == "3"
    assert value(args, "--output") == "/w/runs" and value(args, "--experiment") == "el-seed3"
    for flag, val in zip(extra[::2], extra[1::2]):
        if val.startswith("--"):
            assert flag in args and val in args
        else:
            assert value(args, flag) == val
    if "model" in kw:
        assert value(args, "--model") == kw["model"] and args.count("--model") == 1


def test_extra_flags_replace_the_presets(parser):
    args = args_for("imagenet_efficientnet_b0", parser, world=2,
                    extra=["--batch-size", "192", "--drop-path", "0.1", "--epochs=5", "--model", "efficientnet_b1",
                           "--decay-milestones", "1", "2"])
    groups = dict(flag_groups(args, parser))
    assert groups["batch_size"] == ["--batch-size", "192"] and "-b" not in args
    assert groups["drop_path"] == ["--drop-path", "0.1"] and "--drop-connect" not in args
    assert groups["epochs"] == ["--epochs=5"] and "450" not in args
    assert value(args, "--task-name") == "imagenet_efficientnet_b1"
    assert groups["decay_milestones"] == ["--decay-milestones", "1", "2"]
    # the preset's order is kept, new options come after it
    assert args.index("--batch-size") < args.index("--decay-milestones")


def test_el_flags_after_dashes_go_to_the_el_runs_only(parser, tmp_path):
    extra = ["--bonus-rho", "0.5", "--defer-start", "2", "--log-end", "0.5", "--lr", "0.2"]
    el = args_for("mnist", parser, extra=extra, data=str(tmp_path))
    ce = args_for("mnist", parser, loss="ce", extra=extra, log_end=0.6, data=str(tmp_path))
    assert value(el, "--bonus-rho") == "0.5" and value(el, "--defer-start") == "2" and value(el, "--log-end") == "0.5"
    assert not {"--bonus-rho", "--defer-start", "--log-end"} & set(ce)
    assert value(ce, "--lr") == "0.2" and value(el, "--lr") == "0.2"
    assert value(args_for("mnist", parser, log_end=0.5), "--log-end") == "0.5"
    timm_el.train.parse_args(ce)
    timm_el.train.parse_args(el)


def test_flag_groups(parser):
    tokens = ["-b", "8", "--mean", "0.1", "-0.2", "0.3", "--amp", "--model-kwargs", "a=1", "b=(1,2)",
              "--opt=sgd", "--decay-rate", "-1", "--input-size", "1", "28", "28"]
    assert flag_groups(tokens, parser) == [
        ("batch_size", ["-b", "8"]), ("mean", ["--mean", "0.1", "-0.2", "0.3"]), ("amp", ["--amp"]),
        ("model_kwargs", ["--model-kwargs", "a=1", "b=(1,2)"]), ("opt", ["--opt=sgd"]),
        ("decay_rate", ["--decay-rate", "-1"]), ("input_size", ["--input-size", "1", "28", "28"])]
    for tokens, message in [
        (["--nope", "1"], "unknown timm-el-train option --nope"),
        (["/data"], "unexpected value '/data'"),
        (["--lr"], "--lr needs a value"),
        (["--input-size", "1", "2"], "--input-size needs 3 values"),
        (["--decay-milestones", "--amp"], "--decay-milestones needs at least one value"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
            flag_groups(tokens, parser)
    assert merge_flags(["-b", "8", "--lr", "1"], ["--batch-size", "4", "--amp"], parser) == \
        ["--batch-size", "4", "--lr", "1", "--amp"]


def test_refusals(parser):
    for kw, message in [
        (dict(extra=["--seed", "2"]), "-- --seed: set by the recipe; use the recipe's --seeds"),
        (dict(extra=["--data-dir", "/x"]), "-- --data-dir: set by the recipe; use the recipe's --data"),
        (dict(extra=["--resume", "x.pth.tar"]), "-- --resume: set by the recipe"),
        (dict(extra=["--output=/o"]), "-- --output: set by the recipe; use the recipe's --work"),
        (dict(data=None), "--data: the dataset directory is required"),
        (dict(world=3), "the paper's batch of 256 does not divide over 3 processes"),
        (dict(model="resnet50"), "--model: 'resnet50' is not one of mnist_cnn"),
        (dict(loss="focal"), "--loss: unknown loss 'focal'"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
            args_for("mnist", parser, **kw)
    with pytest.raises(RecipeError, match="--dataset: 'torch/mnist' is not one of torch/cifar10, torch/cifar100"):
        args_for("cifar", parser, dataset="torch/mnist")
    args = args_for("mnist", parser, world=3, extra=["-b", "64"])  # the user's -b: nothing to divide
    assert value(args, "-b") == "64" and args.count("-b") == 1 and "--batch-size" not in args
    assert per_process_batch(768, 2) == 384 and per_process_batch(32, 1) == 32


def test_launch_command():
    assert launch_command(["--x"], python="py") == ["py", "-m", "timm_el.train", "--x"]
    assert launch_command(["--x"], gpus=4, nodes=2, node_rank=1, master_addr="h0", master_port=29600, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "h0", "--master_port", "29600", "-m", "timm_el.train", "--x"]


def _opts(work, **kw):
    base = dict(preset="mnist", work=str(work), data="/data", dataset=None, model=None, download=False, log_end=None,
                gpus=1, nodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29500, loss="el", seed=1,
                dry_run=False)
    base.update(kw)
    return argparse.Namespace(**base)


def write_record(run, text=None):
    """``run/eval/last.json``: a result record as timm-el-train writes it (or ``text``)."""
    (run / "eval").mkdir(parents=True, exist_ok=True)
    if text is None:
        text = json.dumps({"schema": "el-result/1", "task": "mnist", "loss": "el", "seed": 1, "run": run.name,
                           "checkpoint": "last", "metrics": {"top1": 98.0, "top5": 99.9}})
    (run / "eval" / "last.json").write_text(text)


def test_run_states_and_decisions(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "el-seed1"
    calls = []

    def fake_call(cmd, write=True, code=0):
        calls.append(cmd)
        if write:
            write_record(run)
        return code

    monkeypatch.setattr(recipe.subprocess, "call", fake_call)
    assert run_state(run) == "new"
    assert recipe.train(_opts(tmp_path, dry_run=True), []) == 0 and not calls  # dry run: the command only
    assert "-m timm_el.train --data-dir /data" in capsys.readouterr().err
    # a directory left without a checkpoint is moved aside, the run starts again
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("x")
    assert run_state(run) == "incomplete"
    assert recipe.train(_opts(tmp_path), []) == 0
    assert (tmp_path / "runs" / "el-seed1.incomplete" / "args.yaml").is_file()
    assert "--resume" not in calls[-1] and "moved aside" in capsys.readouterr().err
    assert run_state(run) == "finished"
    # finished: skipped
    assert recipe.train(_opts(tmp_path), []) == 0 and len(calls) == 1
    assert "finished" in capsys.readouterr().err
    # interrupted: resumed from last.pth.tar
    (run / "eval" / "last.json").unlink()
    (run / "last.pth.tar").write_bytes(b"")
    assert run_state(run) == "resume"
    assert recipe.train(_opts(tmp_path), []) == 0
    assert calls[-1][-2:] == ["--resume", str(run / "last.pth.tar")]
    # a failed run reports its status; one that writes no record is an error
    (run / "eval" / "last.json").unlink()
    monkeypatch.setattr(recipe.subprocess, "call", lambda cmd: fake_call(cmd, write=False, code=3))
    assert recipe.train(_opts(tmp_path), []) == 3
    assert "exit status 3; run the recipe again to resume it" in capsys.readouterr().err
    monkeypatch.setattr(recipe.subprocess, "call", lambda cmd: fake_call(cmd, write=False))
    assert recipe.train(_opts(tmp_path), []) == 1
    assert "last.json was not written" in capsys.readouterr().err
    # a second incomplete directory gets the next free name
    other = tmp_path / "runs" / "ce-seed2"
    for k in range(2):
        other.mkdir(parents=True)
        recipe._aside(other)
    assert sorted(p.name for p in other.parent.glob("ce-seed2*")) == ["ce-seed2.incomplete", "ce-seed2.incomplete-2"]


def test_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    assert recipe.main(["check", "mnist", "--work", str(tmp_path / "w"), "--data", str(data), "--seeds", "1,2"]) == 0
    with pytest.raises(SystemExit) as exc:
        recipe.main(["check", "mnist", "--work", str(tmp_path / "w"), "--data", str(data), "--losses", "ce focal"])
    assert exc.value.code == 2 and "--losses: unknown loss 'focal'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.main(["check", "mnist", "--work", "w", "--data", str(data), "--losses", "ce", "--log-end", "0.5"])
    assert "--log-end applies to the el runs" in capsys.readouterr().err
    assert recipe.main(["train", "cifar", "--work", str(tmp_path / "w"), "--data", str(data), "--loss", "ce",
                        "--seed", "2", "--gpus", "2", "--dry-run", "--", "-j", "0"]) == 0
    err = capsys.readouterr().err
    assert "torch.distributed.run --nproc_per_node 2" in err and "-b 16" in err and "-j 0" in err
    assert not (tmp_path / "w").exists()
    assert sys.executable in err


@pytest.mark.parametrize("text, problem", [
    ("", "empty (a damaged or partly written file)"),
    ('{"schema": "el-result/1", "task": "mni', "not valid JSON"),
    ('{"schema": "el-result/1"}' + "\0" * 32, "holds NUL bytes"),
    ("[1, 2]", "holds a JSON array, expected an object"),
    ('{"schema": "other"}', "its schema is 'other', not 'el-result/1'"),
])
def test_a_damaged_record_is_not_a_finished_run(tmp_path, monkeypatch, capsys, text, problem):
    """eval/last.json cut off by a crash or a full disk was taken as a finished run, skipped for good."""
    run = tmp_path / "runs" / "el-seed1"
    write_record(run, text)
    (run / "last.pth.tar").write_bytes(b"")
    assert recipe.record_problem(run).startswith(f"result record {run / 'eval' / 'last.json'}: ")
    assert problem in recipe.record_problem(run)
    assert run_state(run) == "resume"
    calls = []
    monkeypatch.setattr(recipe.subprocess, "call", lambda cmd: calls.append(cmd) or write_record(run) or 0)
    assert recipe.train(_opts(tmp_path), []) == 0
    assert calls and calls[-1][-2:] == ["--resume", str(run / "last.pth.tar")]
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if "resuming" in ln]
    assert line.startswith(f"== el-seed1: result record {run / 'eval' / 'last.json'}: ") and problem in line
    assert line.endswith(f"; resuming from {run / 'last.pth.tar'} to write it again")
    assert run_state(run) == "finished"
    # training that leaves the record damaged is an error naming what is wrong with it
    write_record(run, text)
    monkeypatch.setattr(recipe.subprocess, "call", lambda cmd: 0)
    assert recipe.train(_opts(tmp_path), []) == 1
    err = capsys.readouterr().err
    assert f"training ended but result record {run / 'eval' / 'last.json'}: " in err and problem in err


def _env():
    return command_env(threads=1, checkout_on_path=True)


def run(cmd, **kw):
    return run_confined([PY, *map(str, cmd)], env=_env(), cwd=ROOT, timeout=300, **kw)


def test_recipe_read_only_work(tmp_path):
    """An incomplete run (a directory without a checkpoint) in a read-only WORK was an OSError traceback
    from moving it aside; now one line before anything is tried."""
    work = tmp_path / "work"
    (work / "runs" / "ce-seed1").mkdir(parents=True)
    proc = run(["-m", "timm_el.recipe", "train", "mnist", "--work", work, "--data", tmp_path, "--loss", "ce",
                "--seed", "1"], readonly=[work])
    assert proc.returncode == 2
    assert one_error_line(proc, "timm_el.recipe") == \
        f"timm_el.recipe: error: --work {work / 'runs'}: cannot write there ({READ_ONLY})"
    assert "timm_el.train" not in proc.stderr  # nothing launched
    # moving aside itself, where it fails, is one line too
    proc = run(["-c", "import sys; from pathlib import Path; from timm_el import recipe\n"
                "try:\n    recipe._aside(Path(sys.argv[1]))\nexcept recipe.RecipeError as err:\n"
                "    sys.exit(f'error: {err}')", work / "runs" / "ce-seed1"], readonly=[work])
    assert one_error_line(proc, "error:") == (f"error: {work / 'runs' / 'ce-seed1'} holds no checkpoint and cannot be "
                                          f"moved aside to ce-seed1.incomplete: {READ_ONLY}")


@pytest.mark.parametrize("preset, kw, task", [
    ("imagenet_resnet50", {}, "imagenet_resnet50_smoke"),
    ("imagenet_efficientnet_b0", {}, "imagenet_efficientnet_b0_smoke"),
    ("cifar", {}, "cifar10_resnet50_smoke"),
    ("cifar", {"dataset": "torch/cifar100", "model": "efficientnet_b0"}, "cifar100_efficientnet_b0_smoke"),
    ("mnist", {}, "mnist_smoke"),
])
def test_smoke_flags(parser, preset, kw, task):
    """--smoke: the preset's smoke flags over its own, one short epoch, the task marked; the CLI accepts them."""
    smoke = args_for(preset, parser, smoke=True, world=2, **kw)
    real = args_for(preset, parser, world=2, **kw)
    assert value(smoke, "--task-name") == task and value(real, "--task-name") == task[:-len("_smoke")]
    assert value(smoke, "--epochs") == "1" != value(real, "--epochs")
    # the smoke batch is per process, whatever the number of GPUs
    assert value(smoke, "-b") == "64" and smoke.count("-b") == 1
    dests = [d for d, _ in flag_groups(smoke[2:], parser)]
    assert len(dests) == len(set(dests)), dests  # every option once
    for dest, group in flag_groups(list(PRESETS[preset].smoke), parser):
        assert dict(flag_groups(smoke[2:], parser))[dest] == group, dest
    if "model" in kw:
        assert value(smoke, "--model") == kw["model"]
    if preset == "mnist":  # a narrower mnist_cnn
        assert "stem_width=16" in smoke and value(smoke, "--model") == "mnist_cnn"
    else:  # small images for the large models
        assert int(value(smoke, "--img-size")) <= 64
    # warmup and schedule fit in the one epoch: no warmup, no cooldown, no decay before its end
    cli = timm_el.train.build_parser().parse_args(smoke)
    assert cli.warmup_epochs == 0 and cli.cooldown_epochs == 0 and cli.epochs == 1
    assert cli.loss == "encouraging" and cli.log_end == 0.75
    # flags after -- still win
    extra = args_for(preset, parser, smoke=True, extra=["--epochs", "2", "-b", "8"], **kw)
    assert value(extra, "--epochs") == "2" and value(extra, "-b") == "8" and extra.count("-b") == 1


def test_smoke_on_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    work = tmp_path / "w"
    assert recipe.main(["check", "mnist", "--work", str(work), "--data", str(data), "--smoke"]) == 0
    assert recipe.main(["train", "mnist", "--work", str(work), "--data", str(data), "--loss", "ce", "--seed", "1",
                        "--smoke", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "--task-name mnist_smoke" in err and "--epochs 1" in err and "stem_width=16" in err
    assert not work.exists()
