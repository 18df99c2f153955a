"""End to end with the stock fairseq CLIs on a real IWSLT14 De-En slice.

2,000 training pairs, 200 valid, 100 test (not a multiple of 8, so the
fairseq-fixed last-batch drop would show), a tiny Transformer trained on CPU
with the plugin criterion, then fairseq-generate / fairseq-interactive /
resume. Also: the criterion's loss on a real batch equals the core's.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_el")
BIN = Path(sys.executable).parent
N_TEST = 100
UPDATES = 200

TINY = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--dropout", "0.1",
]
OPTIM = [
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "3e-3",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "40",
    "--max-tokens", "2000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--log-format", "simple", "--log-interval", "10", "--no-epoch-checkpoints",
]
EL = ["--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5"]


def run(tool, *args, check=True, stdin=None, timeout=900):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=env, input=stdin, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{out[-4000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def data_bin(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("iwslt14") / "sample"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_iwslt14_sample.py"), "--data", shared_data / "iwslt14-de-en",
         "--out", out, "--train", "2000", "--valid", "200", "--test", str(N_TEST)],
        check=True, capture_output=True,
    )
    return out / "bin"


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    _, log = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *EL,
                 "--max-update", UPDATES, "--save-dir", save)
    return save, log


def train_losses(log):
    return [float(m) for m in re.findall(r"train_inner \|.* loss=([\d.]+)", log)]


def test_training_with_plugin_criterion_lowers_the_loss(trained):
    save, log = trained
    losses = train_losses(log)
    assert len(losses) >= UPDATES // 10 - 1, log[-2000:]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses
    bonuses = [float(b) for b in re.findall(r"train_inner \|.* bonus=(-?[\d.]+)", log)]
    assert bonuses and all(b <= 0 for b in bonuses) and min(bonuses) < 0
    assert f"num_updates {UPDATES}" in log
    assert (save / "checkpoint_best.pt").is_file() and (save / "checkpoint_last.pt").is_file()


def test_generate_translates_every_test_sentence(trained, data_bin):
    save, _ = trained
    _, out = run("fairseq-generate", data_bin, "--user-dir", USER_DIR, "--path", save / "checkpoint_best.pt",
                 "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--remove-bpe", "--cpu")
    assert f"Translated {N_TEST} sentences" in out, out[-2000:]
    hyp_ids = {int(i) for i in re.findall(r"^H-(\d+)\t", out, flags=re.M)}
    assert hyp_ids == set(range(N_TEST))
    bleu = re.search(r"BLEU4? = ([\d.]+)", out)
    assert bleu is not None, out[-2000:]
    assert 0.0 <= float(bleu.group(1)) <= 100.0


def test_interactive_loads_the_checkpoint(trained, data_bin):
    save, _ = trained
    _, out = run("fairseq-interactive", data_bin, "--user-dir", USER_DIR, "--path", save / "checkpoint_best.pt",
                 "--source-lang", "de", "--target-lang", "en", "--beam", "2", "--cpu", "--remove-bpe",
                 stdin="das ist gut .\nwir haben es gemacht .\n")
    assert len(re.findall(r"^H-\d+\t", out, flags=re.M)) == 2, out[-2000:]


def test_training_resumes_from_checkpoint_last(trained, data_bin):
    save, _ = trained
    _, log = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *EL,
                 "--max-update", UPDATES + 20, "--save-dir", save)
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {UPDATES} updates\)", log), log[-3000:]
    assert f"num_updates {UPDATES + 20}" in log


def test_stock_load_without_plugin_is_what_we_fix(trained):
    """torch >= 2.6 refuses the checkpoint by default; the plugin's allow-list
    accepts it with weights_only still on."""
    save, _ = trained
    code = (
        "import torch, sys\n"
        "try:\n"
        "    torch.load(sys.argv[1], map_location='cpu')\n"
        "except Exception as e:\n"
        "    print('REFUSED', type(e).__name__)\n"
        "import fairseq_el\n"
        "state = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
        "print('LOADED', sorted(state)[:3])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(save / "checkpoint_last.pt")],
                         capture_output=True, text=True, check=True).stdout
    assert "REFUSED" in out and "LOADED" in out


def test_bad_flag_is_a_clean_cli_error(data_bin):
    rc, out = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *EL[:-1], "1.5",
                  "--max-update", "1", check=False)
    assert rc == 2
    assert "--log-end must be in (0, 1], got 1.5" in out
    assert "Traceback" not in out


def test_criterion_loss_equals_core_functional(trained, data_bin):
    import fairseq_el  # noqa: F401  (registers the criterion, allows the checkpoint)
    from fairseq import checkpoint_utils

    from encouraging_loss import encouraging_loss

    save, _ = trained
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_best.pt")], arg_overrides={"data": str(data_bin)}
    )
    model = models[0].eval()
    task.load_dataset("valid")
    criterion = task.build_criterion(cfg.criterion)
    assert type(criterion).__name__ == "EncouragingLabelSmoothedCrossEntropyCriterion"
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=2000).next_epoch_itr(shuffle=False)
    sample = next(iter(itr))
    with torch.no_grad():
        loss, sample_size, log = criterion(model, sample)
        logits = model(**sample["net_input"])[0]
    pad = task.target_dictionary.pad()
    assert (sample["target"] == pad).any(), "want a batch with padding"
    expected = encouraging_loss(logits.view(-1, logits.size(-1)), sample["target"].view(-1), log_end=0.5,
                                smoothing=0.1, ignore_index=pad, reduction="sum", return_parts=True)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(log["nll_loss"], expected.nll_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(log["bonus"], expected.bonus, rtol=1e-6, atol=0)
    assert sample_size == sample["ntokens"]
    # the fused default agrees with the plain formula (float32 logits)
    reference = encouraging_loss(logits.view(-1, logits.size(-1)), sample["target"].view(-1), log_end=0.5,
                                 smoothing=0.1, ignore_index=pad, reduction="sum", impl="reference")
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    # and the plain NLL is fairseq's: -log p_y summed over non-padding tokens
    lprobs = torch.log_softmax(logits.float(), -1).view(-1, logits.size(-1))
    t = sample["target"].view(-1)
    nll = -lprobs[t != pad].gather(1, t[t != pad, None]).sum()
    torch.testing.assert_close(log["nll_loss"], nll, rtol=1e-5, atol=0)


def _criterion_and_batch(trained, data_bin, **overrides):
    import fairseq_el  # noqa: F401
    from fairseq import checkpoint_utils

    save, _ = trained
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_best.pt")], arg_overrides={"data": str(data_bin)}
    )
    task.load_dataset("valid")
    for key, value in overrides.items():
        setattr(cfg.criterion, key, value)
    criterion = task.build_criterion(cfg.criterion)
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=2000).next_epoch_itr(shuffle=False)
    return models[0].eval(), criterion, next(iter(itr))


def test_fused_projection_equals_the_unfused_criterion(trained, data_bin):
    """--el-fused-projection: same loss, logged terms, accuracy and parameter
    gradients (shared embeddings included) as the criterion on full logits."""
    model, plain, sample = _criterion_and_batch(trained, data_bin, report_accuracy=True)
    _, fused, _ = _criterion_and_batch(trained, data_bin, report_accuracy=True, el_fused_projection=True)
    assert fused.el_fused_projection and not plain.el_fused_projection
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight  # shared
    results = []
    for criterion in (plain, fused):
        model.zero_grad()
        loss, size, log = criterion(model, sample)
        (loss * 0.5).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), size, log, grads))
    (l1, s1, log1, g1), (l2, s2, log2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    assert s1 == s2 and log1["n_correct"] == log2["n_correct"] and log1["total"] == log2["total"]
    for key in ("nll_loss", "bonus"):
        torch.testing.assert_close(log2[key], log1[key], rtol=1e-5, atol=1e-6)
    # --share-all-embeddings: one tensor, listed once, is the projection's weight
    assert g1.keys() == g2.keys() and "encoder.embed_tokens.weight" in g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_projection_trains_like_the_unfused_criterion(data_bin, tmp_path):
    """Stock fairseq-train with --el-fused-projection: the same training curve."""
    curves = []
    for i, extra in enumerate(([], ["--el-fused-projection"])):
        _, log = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *EL, *extra,
                     "--max-update", "30", "--save-dir", tmp_path / str(i), "--no-save")
        curves.append(train_losses(log))
    assert len(curves[0]) == 3
    for a, b in zip(*curves):
        assert abs(a - b) <= 2e-3 * a, curves


def test_fused_projection_refuses_the_reference_impl(data_bin):
    rc, out = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *EL,
                  "--el-fused-projection", "--el-impl", "reference", "--max-update", "1", check=False)
    assert rc == 2, out[-2000:]
    assert "--el-fused-projection needs --el-impl fused, got --el-impl reference" in out
    assert "Traceback" not in out
