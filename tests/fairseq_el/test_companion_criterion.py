"""The companion-loss criteria (fairseq_el.companion_criterion): the stock
``fairseq-train`` with ``--criterion halted_focal_cross_entropy`` on a real
IWSLT14 De-En slice (a tiny Transformer, a few updates on CPU), the criteria's
loss on a real batch against the core, and the flag checks."""
import re

import pytest
import torch

from helpers import TINY_TRANSFORMER as TINY
from helpers import USER_DIR
from helpers import run_tool as run

UPDATES = 8

OPTIM = [
    "--optimizer", "adam", "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4",
    "--max-tokens", "1000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--log-format", "simple", "--log-interval", "2", "--no-epoch-checkpoints",
]
HFL = ["--criterion", "halted_focal_cross_entropy", "--label-smoothing", "0.1", "--halt-point", "0.5"]


@pytest.fixture(scope="module")
def data_bin(iwslt14_slice):
    return iwslt14_slice(160, 24, 8) / "bin"


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("hfl_ckpt")
    _, log = run("fairseq-train", data_bin, "--user-dir", USER_DIR, *TINY, *OPTIM, *HFL,
                 "--max-update", UPDATES, "--save-dir", save)
    return save, log


def test_stock_fairseq_train_with_halted_focal_loss(trained):
    save, log = trained
    inner = re.findall(r"train_inner \|.* loss=([\d.]+), nll_loss=([\d.]+), ppl=([\d.]+)", log)
    print("train_inner loss / nll_loss / ppl:", inner)
    assert len(inner) >= UPDATES // 2 - 1, log[-3000:]
    losses = [float(loss) for loss, _, _ in inner]
    assert losses[-1] < losses[0], losses
    assert re.search(r"valid \|.* loss [\d.]+ \| nll_loss [\d.]+ \| ppl [\d.]+", log), log[-2000:]
    assert f"num_updates {UPDATES}" in log
    assert "'_name': 'halted_focal_cross_entropy'" in log and "'halt_point': 0.5" in log
    assert (save / "checkpoint_last.pt").is_file()


def _model_task_batch(save, data_bin):
    from fairseq import checkpoint_utils

    import fairseq_el  # noqa: F401  (registers the criteria, allows the checkpoint)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(data_bin)})
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=1000).next_epoch_itr(shuffle=False)))
    return models[0].eval(), cfg, task, sample


def test_criteria_losses_equal_the_core_on_a_real_batch(trained, data_bin):
    from encouraging_loss import focal_loss, halted_focal_loss, mirror_mse_loss
    from fairseq_el.companion_criterion import (
        FocalCrossEntropyCriterion,
        HaltedFocalCrossEntropyCriterion,
        MSEMirrorBonusCriterion,
    )

    model, cfg, task, sample = _model_task_batch(trained[0], data_bin)
    saved = task.build_criterion(cfg.criterion)
    assert type(saved) is HaltedFocalCrossEntropyCriterion
    pad = task.target_dictionary.pad()
    assert (sample["target"] == pad).any(), "want a batch with padding"
    with torch.no_grad():
        logits = model(**sample["net_input"])[0]
    z, t = logits.view(-1, logits.size(-1)), sample["target"].view(-1)
    lprobs = torch.log_softmax(z.float(), -1)
    nll = -lprobs[t != pad].gather(1, t[t != pad, None]).sum()
    cases = [
        (saved, halted_focal_loss(z, t, halt=0.5, smoothing=0.1, ignore_index=pad, reduction="sum")),
        (FocalCrossEntropyCriterion(task, False, 0.0, focal_gamma=1.0),
         focal_loss(z, t, gamma=1.0, ignore_index=pad, reduction="sum")),
        (HaltedFocalCrossEntropyCriterion(task, False, 0.0, focal_gamma=3.0, halt_point=0.2),
         halted_focal_loss(z, t, gamma=3.0, halt=0.2, ignore_index=pad, reduction="sum")),
        (MSEMirrorBonusCriterion(task, False, 0.1),
         mirror_mse_loss(z, t, smoothing=0.1, ignore_index=pad, reduction="sum")),
        (MSEMirrorBonusCriterion(task, False, 0.0, mse_activation="sigmoid", mirror_rho=0.5, mirror_gamma=3.0),
         mirror_mse_loss(z, t, activation="sigmoid", mirror_rho=0.5, mirror_gamma=3.0, ignore_index=pad,
                         reduction="sum")),
    ]
    for criterion, expected in cases:
        with torch.no_grad():
            loss, sample_size, log = criterion(model, sample)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(log["nll_loss"], nll, rtol=1e-5, atol=0)
        assert sample_size == sample["ntokens"] and log["ntokens"] == sample["ntokens"]
    # the loss trains: a backward pass through the MSE criterion reaches the model's weights
    model.train()
    model.zero_grad()
    loss, _, _ = MSEMirrorBonusCriterion(task, False, 0.0, mse_activation="sigmoid")(model, sample)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _parse(argv):
    from fairseq import options

    import fairseq_el  # noqa: F401

    return options.parse_args_and_arch(options.get_training_parser(), input_args=argv)


BASE = ["DATA", "--arch", "transformer_iwslt_de_en"]


def test_parser_takes_the_flags_with_their_defaults():
    args = _parse(BASE + ["--criterion", "halted_focal_cross_entropy"])
    assert (args.focal_gamma, args.halt_point, args.label_smoothing) == (2.0, 0.5, 0.0)
    args = _parse(BASE + ["--criterion", "focal_cross_entropy", "--focal-gamma", "0"])
    assert args.focal_gamma == 0.0 and not hasattr(args, "halt_point")
    args = _parse(BASE + ["--criterion", "mse_mirror_bonus", "--mse-activation", "sigmoid", "--mirror-rho", "0"])
    assert (args.mse_activation, args.mirror_rho, args.mirror_gamma) == ("sigmoid", 0.0, 2.0)


BAD_FLAGS = [
    (["--criterion", "halted_focal_cross_entropy", "--halt-point", "1"],
     "argument --halt-point: --halt-point must be in (0, 1), got 1.0"),
    (["--criterion", "halted_focal_cross_entropy", "--focal-gamma=-1"],
     "argument --focal-gamma: --focal-gamma must be a finite number >= 0, got -1.0"),
    (["--criterion", "focal_cross_entropy", "--label-smoothing", "1"],
     "argument --label-smoothing: --label-smoothing must be in [0, 1), got 1.0"),
    (["--criterion", "mse_mirror_bonus", "--mirror-gamma", "0"],
     "argument --mirror-gamma: --mirror-gamma must be a finite number > 0, got 0.0"),
    (["--criterion", "mse_mirror_bonus", "--mirror-rho", "nan"],
     "argument --mirror-rho: --mirror-rho must be a finite number >= 0, got nan"),
    (["--criterion", "mse_mirror_bonus", "--mse-activation", "relu"], "argument --mse-activation: invalid choice"),
    (["--criterion", "focal_cross_entropy", "--halt-point", "0.3"], "unrecognized arguments: --halt-point 0.3"),
    (["--criterion", "mse_mirror_bonus", "--focal-gamma", "1"], "unrecognized arguments: --focal-gamma 1"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_parser_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(BASE + flags)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(("-: error: ", "pytest: error: ")) or ": error: " in last
    assert last.split(": error: ", 1)[1].startswith(message), last


def test_criteria_built_another_way_check_their_settings():
    from fairseq.data import Dictionary
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    import fairseq_el  # noqa: F401
    from fairseq_el.companion_criterion import HaltedFocalCrossEntropyCriterion, MSEMirrorBonusCriterion

    d = Dictionary()
    task = TranslationTask(TranslationConfig(), d, d)
    with pytest.raises(ValueError, match=re.escape("--halt-point must be in (0, 1), got 0")):
        HaltedFocalCrossEntropyCriterion(task, False, 0.0, halt_point=0)
    with pytest.raises(ValueError, match=re.escape("--mse-activation must be one of softmax, sigmoid, got 'tanh'")):
        MSEMirrorBonusCriterion(task, False, 0.0, mse_activation="tanh")
    with pytest.raises(ValueError, match=re.escape("--label-smoothing must be in [0, 1), got 1.0")):
        MSEMirrorBonusCriterion(task, False, 1.0)


def test_stock_fairseq_train_bad_flag_is_one_line(tmp_path):
    """The stock CLI stops before touching the data directory (which does not exist)."""
    rc, out = run("fairseq-train", tmp_path / "no-data", "--user-dir", USER_DIR, *TINY, *HFL[:-1], "1.5",
                  "--save-dir", tmp_path / "ckpt", check=False)
    assert rc == 2
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == \
        "fairseq-train: error: argument --halt-point: --halt-point must be in (0, 1), got 1.5"
    assert not (tmp_path / "ckpt").exists()
