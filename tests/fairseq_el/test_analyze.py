"""fairseq_el.analyze: token-level analysis of real fairseq checkpoints.

Two tiny Transformers (stock ``label_smoothed_cross_entropy`` and the plugin's
Encouraging Loss) are trained for a few updates on a real IWSLT14 slice, then
analysed with teacher forcing on its test split (the valid split standing in
for an OOD set). The per-token accumulation is checked against the core's
``analyze`` on the full logits, the token count against the reference text,
and the token accuracy against stock ``fairseq-validate --report-accuracy``.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from encouraging_loss.tools import analysis
from fairseq_el.analyze import TokenStats, main

from helpers import BIN, ROOT, USER_DIR, command_env

N_TEST, N_VALID = 40, 20
TINY = [
    "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "10", "--max-tokens", "2000", "--num-workers", "0", "--cpu", "--seed", "1",
    "--max-update", "25", "--no-epoch-checkpoints", "--no-save-optimizer-state", "--disable-validation",
    "--log-format", "simple", "--log-interval", "10", "--label-smoothing", "0.1",
]
LOSSES = {
    "ce": ["--criterion", "label_smoothed_cross_entropy"],
    "el": ["--criterion", "encouraging_label_smoothed_cross_entropy", "--log-end", "0.5"],
}


def analyze_in_process(capsys, *args):
    """``main(ARGS)`` in this process -> (exit status, stderr's error lines)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if "error:" in line]


def analyze_cli(*args):
    """``python -m fairseq_el.analyze ARGS`` -> (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "fairseq_el.analyze", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=command_env(), timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def sample(iwslt14_slice):
    return iwslt14_slice(300, N_VALID, N_TEST)


@pytest.fixture(scope="module")
def checkpoints(sample, tmp_path_factory):
    paths = {}
    for loss, flags in LOSSES.items():
        save = tmp_path_factory.mktemp(f"run_{loss}")
        proc = subprocess.run([str(BIN / "fairseq-train"), str(sample / "bin"), "--user-dir", USER_DIR, *TINY,
                               *flags, "--save-dir", str(save)],
                              capture_output=True, text=True, env=command_env(), timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        paths[loss] = save / "checkpoint_last.pt"
    return paths


@pytest.fixture(scope="module")
def report(sample, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc, stdout, stderr = analyze_cli(sample / "bin", "--path", checkpoints["ce"], checkpoints["el"],
                                     "--ood-subset", "valid", "--out", out, "--energy-classes", "10")
    assert rc == 0, stderr[-3000:]
    return out, stdout, stderr


def _reference_tokens(path: Path) -> int:
    """Target tokens of a split: its BPE'd words plus one end-of-sentence each."""
    return sum(len(line.split()) + 1 for line in path.read_text(encoding="utf-8").splitlines())


def test_token_stats_in_batches_equal_the_core_on_all_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 7, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, 7, (300,), generator=gen)
    zo = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    stats = TokenStats(7)
    stats.update(z[:120], t[:120])
    stats.update(z[120:120], t[120:120])  # an empty batch changes nothing
    stats.update(z[120:], t[120:])
    stats.update_ood(zo[:10])
    stats.update_ood(zo[10:])
    ours, raw = stats.summary(n_bins=15)
    ref, ref_raw = analysis.analyze(z, t, ood_logits=zo, n_bins=15)
    per_class = ours.pop("energy_per_class")
    assert per_class.pop("classes") == list(range(7))
    assert set(ours) == set(ref) - {"energy_per_class"}
    for key in ours:
        if isinstance(ours[key], float):
            assert ours[key] == pytest.approx(ref[key], rel=1e-12), key
    assert ours["n"] == 300 and ours["ood"]["n"] == 50
    for key in ref["margin"]:
        assert ours["margin"][key] == pytest.approx(ref["margin"][key], rel=1e-12, abs=1e-12), key
    for key in ref["energy"]["data"]:
        assert ours["energy"]["data"][key] == pytest.approx(ref["energy"]["data"][key], rel=1e-12), key
    for key in ref["energy"]["ood"]:
        assert ours["energy"]["ood"][key] == pytest.approx(ref["energy"]["ood"][key], rel=1e-12), key
    for score in analysis.OOD_SCORES:
        for key in ("auroc", "fpr95"):
            assert ours["ood"][score][key] == pytest.approx(ref["ood"][score][key], rel=1e-12), (score, key)
    assert [r["count"] for r in ours["reliability"]] == [r["count"] for r in ref["reliability"]]
    for key in ("count", "target", "other"):
        assert per_class[key] == pytest.approx(ref["energy_per_class"][key], rel=1e-12), key
    np.testing.assert_allclose(raw["margins"], ref_raw["margins"], rtol=1e-12)
    np.testing.assert_array_equal(raw["correct"], ref_raw["correct"])


def test_token_stats_per_class_ranks_the_most_frequent_references():
    # 4 classes; class 2 is the reference 3 times, class 0 twice, class 3 once, class 1 never
    z = torch.tensor([[1., 0., 2., 0.], [0., 0., 3., 1.], [2., 1., 0., 0.], [1., 0., 4., 0.],
                      [3., 0., 0., 1.], [0., 2., 0., 5.]])
    t = torch.tensor([2, 2, 0, 2, 0, 3])
    stats = TokenStats(4)
    stats.update(z, t)
    top = stats.per_class(top=2)
    assert top["classes"] == [2, 0] and top["count"] == [3, 2]
    assert top["target"] == pytest.approx([-(2 + 3 + 4) / 3, -(2 + 3) / 2])  # mean -z_c over its tokens
    assert top["other"] == pytest.approx([0.0, -(1 + 0 + 1 + 0) / 4])       # over the other tokens
    assert stats.per_class(top=10)["classes"] == [2, 0, 3]  # class 1 never occurs


def test_bad_input_is_one_line(sample, checkpoints, tmp_path, capsys):
    cases = [
        (["--path", checkpoints["ce"], "--names", "a", "b", "--out", tmp_path / "x"], "--names: 2 name(s) for 1"),
        (["--path", tmp_path / "missing.pt", "--out", tmp_path / "x"], "--path"),
        (["--path", checkpoints["ce"], "--out", tmp_path / "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--path", checkpoints["ce"], "--out", tmp_path / "x", "--ood-subset", "test"], "the OOD split is"),
        (["--path", checkpoints["ce"], "--out", tmp_path / "x", "--gen-subset", "nosuch"], "--gen-subset nosuch"),
    ]
    for args, message in cases:
        rc, errors = analyze_in_process(capsys, sample / "bin", *args)
        assert rc == 2, (args, errors)
        assert len(errors) == 1 and message in errors[0], (message, errors)
        assert errors[0].startswith("python -m fairseq_el.analyze: error: ")
        assert not (tmp_path / "x" / "report.json").exists()


def test_report_has_both_models_finite_numbers_and_plots(report, sample):
    out, stdout, stderr = report
    rec = json.loads((out / "report.json").read_text())
    models = rec["models"]
    assert list(models) == ["ce", "el"]  # the names come from the checkpoints' criteria
    assert rec["meta"]["level"] == "token"
    assert rec["meta"]["models"]["el"]["criterion"] == "encouraging_label_smoothed_cross_entropy"
    n_test = _reference_tokens(sample / "text" / "test.en")
    n_valid = _reference_tokens(sample / "text" / "valid.en")
    for name, s in models.items():
        assert s["n"] == n_test and s["n_sentences"] == N_TEST, name
        assert s["ood"]["n"] == n_valid and s["ood"]["n_sentences"] == N_VALID, name
        numbers = [s["accuracy"], s["ece"], *s["margin"].values(), *s["energy"]["data"].values(),
                   *s["energy"]["ood"].values()]
        numbers += [s["ood"][k][m] for k in analysis.OOD_SCORES for m in ("auroc", "fpr95")]
        assert all(isinstance(x, float) and np.isfinite(x) for x in numbers), (name, numbers)
        assert 0 < s["accuracy"] < 100 and 0 <= s["ece"] <= 100
        assert s["margin"]["min"] <= s["margin"]["median"] <= s["margin"]["max"]
        # min_k E(x, k) <= E(x, y) and free energy <= min energy, token by token, hence in the means
        data = s["energy"]["data"]
        assert data["free_mean"] <= data["min_mean"] <= data["target_mean"]
        assert s["n_bins"] == 15 and sum(r["count"] for r in s["reliability"]) == n_test
        per_class = s["energy_per_class"]
        assert len(per_class["classes"]) == 10 and len(per_class["tokens"]) == 10
        assert per_class["count"] == sorted(per_class["count"], reverse=True)
        assert s["probe"] is None
    for name in ("report.md", "margins.png", "energy_per_class.png", "reliability.png", "ood_scores.png"):
        assert (out / name).stat().st_size > 0, name
    import matplotlib.image

    for name in ("margins.png", "energy_per_class.png", "reliability.png", "ood_scores.png"):
        assert matplotlib.image.imread(out / name).ndim == 3, name
    # the Markdown table on stdout, the same as report.md
    assert stdout == (out / "report.md").read_text()
    assert "| measurement | ce | el |" in stdout


def test_token_accuracy_matches_stock_fairseq_validate(report, sample, checkpoints):
    out, _, _ = report
    models = json.loads((out / "report.json").read_text())["models"]
    proc = subprocess.run(
        [str(BIN / "fairseq-validate"), str(sample / "bin"), "--user-dir", USER_DIR, "--path", checkpoints["el"],
         "--task", "translation", "--valid-subset", "test", "--cpu", "--max-tokens", "4096",
         "--criterion", "label_smoothed_cross_entropy",
         "--report-accuracy", "--num-workers", "0"],
        capture_output=True, text=True, env=command_env(), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    accuracy = float(re.findall(r"\| accuracy ([\d.]+)", log)[-1])
    assert models["el"]["accuracy"] == pytest.approx(accuracy, abs=0.006)  # fairseq rounds to 2 decimals


def test_existing_report_is_refused_without_force(report, sample, checkpoints, capsys):
    out, _, _ = report
    before = (out / "report.json").read_text()
    rc, errors = analyze_in_process(capsys, sample / "bin", "--path", checkpoints["ce"], "--out", out)
    assert rc == 2 and len(errors) == 1 and "pass --force" in errors[0]
    assert (out / "report.json").read_text() == before
