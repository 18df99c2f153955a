"""fairseq_el.criterion: its flags, defaults and schedule in-process, then end to end with the stock fairseq CLIs
on a real IWSLT14 De-En slice.

2,000 training pairs, 200 valid, 100 test (not a multiple of 8, so the
fairseq-fixed last-batch drop would show), a tiny Transformer trained on CPU
with the plugin criterion, then fairseq-generate / fairseq-interactive /
resume. Also: the criterion's loss on a real batch equals the core's.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import USER_DIR
from helpers import run_tool as run

N_TEST = 100
UPDATES = 100  # 3 epochs; the loss falls by about 3 (the test wants > 1)

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


@pytest.fixture(scope="module")
def data_bin(iwslt14_slice):
    return iwslt14_slice(2000, 200, N_TEST) / "bin"


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
    from fairseq import checkpoint_utils

    import fairseq_el  # noqa: F401  (registers the criterion, allows the checkpoint)
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
    from fairseq import checkpoint_utils

    import fairseq_el  # noqa: F401

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


def _criterion(**overrides):

    from fairseq.data import Dictionary
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    import fairseq_el  # noqa: F401
    from fairseq_el.criterion import EncouragingLabelSmoothedCrossEntropyCriterion

    d = Dictionary()
    task = TranslationTask(TranslationConfig(), d, d)
    args = dict(sentence_avg=False, label_smoothing=0.1)
    args.update(overrides)
    return EncouragingLabelSmoothedCrossEntropyCriterion(task, **args), task


def test_defaults_match_the_paper_translation_runs():
    from fairseq_el.criterion import EncouragingLabelSmoothedCrossEntropyConfig

    cfg = EncouragingLabelSmoothedCrossEntropyConfig()
    assert cfg.log_end == 0.5 and cfg.bonus == "log" and cfg.bonus_rho == 1.0 and cfg.bonus_smoothing is None


def test_defer_start_and_schedule_follow_the_epochs():
    crit, task = _criterion(defer_start=2, bonus_schedule="linear", max_epoch=10, bonus_rho=2.0)
    assert crit.current.rho == 0.0
    task.begin_epoch(2, None)
    assert crit.current.rho == 0.0
    task.begin_epoch(3, None)
    assert crit.current.rho == pytest.approx(2.0 * 3 / 10)
    task.begin_epoch(10, None)
    assert crit.current.rho == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(log_end=1.5), "--log-end must be in (0, 1], got 1.5"),
        (dict(log_end=0.0), "--log-end must be in (0, 1], got 0.0"),
        (dict(bonus_start=1.0), "--bonus-start must be in [0, 1), got 1.0"),
        (dict(bonus="nope"), "--bonus must be one of log, power, cosine, got 'nope'"),
        (dict(label_smoothing=1.0), "--label-smoothing must be in [0, 1), got 1.0"),
        (dict(bonus_smoothing=-0.1), "--bonus-smoothing must be in [0, 1), got -0.1"),
        (dict(bonus_schedule="cosine"),
         "--bonus-schedule cosine ramps the bonus over epochs and needs --max-epoch > 0"),
        (dict(defer_start=-1), "--defer-start must be an integer >= 0, got -1"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as err:
        _criterion(**kwargs)
    assert message in str(err.value)


def test_criterion_help_lists_the_flags(capsys, monkeypatch):
    from fairseq_el.__main__ import main

    # the command once (its exit status and one-line error), then its main() in-process: no python start-up each
    bad = subprocess.run([sys.executable, "-m", "fairseq_el", "--criterion-help", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'nope'" in bad.stderr
    monkeypatch.setenv("COLUMNS", "80")  # the help's line width, as in a subprocess whose output is a pipe
    assert main(["--criterion-help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--log-end", "--bonus ", "--bonus-start", "--bonus-rho", "--bonus-smoothing", "--defer-start",
                 "--bonus-schedule", "--label-smoothing"):
        assert flag in out
    assert main(["--criterion-help", "halted_focal_cross_entropy"]) == 0
    out = capsys.readouterr().out
    assert "--criterion halted_focal_cross_entropy" in out and "--halt-point" in out and "--focal-gamma" in out
    assert "--log-end" not in out
    with pytest.raises(SystemExit) as exit_:
        main(["--criterion-help", "nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'nope'" in err


BAD_FLAGS = [
    (["--bonus-schedule-rate", "nan"],
     "argument --bonus-schedule-rate: --bonus-schedule-rate must be a finite number > 0, got nan"),
    (["--bonus-schedule-rate=-1e9"],
     "argument --bonus-schedule-rate: --bonus-schedule-rate must be a finite number > 0, got -1000000000.0"),
    (["--defer-start", "-1"], "argument --defer-start: --defer-start must be an integer >= 0, got -1"),
    (["--bonus-schedule", "linear"],
     "--bonus-schedule linear ramps the bonus over epochs and needs --max-epoch > 0, got 0"),
    (["--bonus-schedule", "exp", "--max-epoch", "0"],
     "--bonus-schedule exp ramps the bonus over epochs and needs --max-epoch > 0, got 0"),
    (["--log-end", "nan"], "argument --log-end: --log-end must be in (0, 1], got nan"),
    (["--bonus-gamma", "inf"], "argument --bonus-gamma: --bonus-gamma must be a finite number > 0, got inf"),
    (["--bonus-rho=-0.5"], "argument --bonus-rho: --bonus-rho must be a finite number >= 0, got -0.5"),
    (["--label-smoothing", "1"], "argument --label-smoothing: --label-smoothing must be in [0, 1), got 1.0"),
]


ARGS = ["DATA", "--arch", "transformer_iwslt_de_en", "--criterion", "encouraging_label_smoothed_cross_entropy"]


def _parse(argv):
    from fairseq import options

    import fairseq_el  # noqa: F401

    return options.parse_args_and_arch(options.get_training_parser(), input_args=argv)


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_fairseq_parser_refuses_bad_flags_before_training(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(ARGS + flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {message}"), err[-1]


def test_fairseq_parser_accepts_good_combinations():
    args = _parse(ARGS + ["--bonus-schedule", "exp", "--max-epoch", "5", "--bonus-schedule-rate", "2",
                          "--defer-start", "1"])
    assert (args.bonus_schedule, args.max_epoch, args.bonus_schedule_rate, args.defer_start) == ("exp", 5, 2.0, 1)
    # other criteria are not checked by ours
    other = _parse(["DATA", "--arch", "transformer_iwslt_de_en", "--criterion", "label_smoothed_cross_entropy"])
    assert other.criterion == "label_smoothed_cross_entropy"


@pytest.mark.parametrize("flags, in_process", [(["--bonus-schedule-rate", "nan"], False),
                                               (["--bonus-schedule", "cosine"], True)],
                         ids=["rate-nan", "schedule-without-max-epoch"])
def test_stock_fairseq_train_stops_with_one_line(flags, in_process, tmp_path, capsys, monkeypatch):
    """The stock CLI, before it touches the data directory (which does not exist): the console script in a
    fresh python, or (no start-up) the function it calls, fairseq_cli.train.cli_main, with the same argv."""

    import fairseq_el

    tool = Path(sys.executable).parent / "fairseq-train"
    argv = [str(tool), str(tmp_path / "no-data"), "--user-dir", fairseq_el.user_dir(), *ARGS[1:], *flags,
            "--save-dir", str(tmp_path / "ckpt")]
    if in_process:
        from fairseq_cli.train import cli_main

        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            cli_main()
        returncode, stderr = exit_.value.code, capsys.readouterr().err
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        returncode, stderr = proc.returncode, proc.stderr
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("fairseq-train: error: ")
    assert "--bonus-schedule" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ckpt").exists()
