"""encouraging_loss.tools.analysis: margins, energies, OOD metrics, ECE, probe and the report,
against hand-computed cases (EL_SPEC 5)."""
import json
import math

import numpy as np
import pytest
import torch

from encouraging_loss.tools import analysis as A

# three examples, three classes; margins 1, 0.5, -3 by hand
Z = torch.tensor([[2.0, 1.0, 0.0],
                  [0.0, 3.0, 2.5],
                  [1.0, -1.0, 4.0]])
T = torch.tensor([0, 1, 0])


# ----------------------------------------------------------------------------- margins and energies


def test_margins_on_fixed_logits():
    assert A.margins(Z, T).tolist() == [1.0, 0.5, -3.0]
    # a tie between the target and another class is a zero margin
    assert A.margins([[0.0, 3.0, 3.0]], [1]).tolist() == [0.0]
    # numpy and lists work; leading dimensions are flattened (tokens: [B, L, V])
    assert A.margins(Z.numpy(), T.numpy()).tolist() == [1.0, 0.5, -3.0]
    assert A.margins(Z.reshape(1, 3, 3), T.reshape(1, 3)).tolist() == [1.0, 0.5, -3.0]


def test_margins_refuse_bad_input():
    with pytest.raises(ValueError, match="at least 2 classes, got logits with 1 class"):
        A.margins(torch.ones(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        A.margins(Z, [0, 1, 3])
    with pytest.raises(ValueError, match="target has 2 entries but logits have 3 rows"):
        A.margins(Z, [0, 1])


def test_energies_and_ood_scores_on_fixed_logits():
    assert torch.equal(A.conditional_energy(Z), -Z)
    lse = [math.log(math.exp(2) + math.exp(1) + 1), math.log(1 + math.exp(3) + math.exp(2.5)),
           math.log(math.exp(1) + math.exp(-1) + math.exp(4))]
    assert A.free_energy(Z).tolist() == pytest.approx([-v for v in lse], abs=1e-6)
    scores = A.ood_scores(Z)
    assert set(scores) == set(A.OOD_SCORES) == {"min_energy", "msp", "free_energy"}
    assert scores["min_energy"].tolist() == [2.0, 3.0, 4.0]  # -min_k E(x, k) = max logit
    assert scores["free_energy"].tolist() == pytest.approx(lse, abs=1e-6)
    assert scores["msp"].tolist() == pytest.approx([math.exp(m - s) for m, s in zip([2, 3, 4], lse)], abs=1e-6)


# ----------------------------------------------------------------------------- OOD metrics


def test_auroc_counts_ties_as_one_half():
    # pairs (in > out): 3 beats all three (3); each 2 ties one and beats two (2.5 x 2);
    # 1 ties one and beats one (1.5): 9.5 of 12
    assert A.auroc([3, 2, 2, 1], [2, 1, 0]) == pytest.approx(9.5 / 12)
    assert A.auroc([1, 1], [1, 1, 1]) == 0.5
    assert A.auroc([5, 6], [1, 2, 3]) == 1.0
    assert A.auroc([1, 2], [3, 4]) == 0.0
    # tensors, arrays and lists are the same
    assert A.auroc(torch.tensor([3.0, 2, 2, 1]), np.array([2, 1, 0])) == pytest.approx(9.5 / 12)


def test_auroc_matches_sklearn_on_tied_scores():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 70).astype(float), rng.integers(0, 6, 50).astype(float) - 1
    expect = sklearn.roc_auc_score(np.r_[np.ones(70), np.zeros(50)], np.r_[a, b])
    assert A.auroc(a, b) == pytest.approx(expect, abs=1e-12)


def test_fpr_at_tpr_hand_computed():
    scores_in = list(range(1, 21))  # 20 in-distribution scores: 95% keeps 19 of them, threshold 2
    assert A.fpr_at_tpr(scores_in, [0, 1, 2, 2, 3, 10]) == pytest.approx(4 / 6)  # the 2s are accepted
    assert A.fpr_at_tpr(scores_in, [0, 1, 1.5]) == 0.0
    # 50% of [4, 3, 2, 1]: threshold 3
    assert A.fpr_at_tpr([4, 3, 2, 1], [3, 2.5, 5], tpr=0.5) == pytest.approx(2 / 3)
    # in-distribution ties at the threshold are all accepted (the TPR becomes 3/4 here)
    assert A.fpr_at_tpr([5, 5, 5, 1], [5, 4], tpr=0.5) == 0.5
    # tpr 1: the threshold is the lowest in-distribution score
    assert A.fpr_at_tpr([5, 5, 5, 1], [1, 0.5], tpr=1.0) == 0.5
    # 0.95 * 60 = 57 exactly, not 58 through rounding: threshold is the 57th highest of 1..60, i.e. 4
    assert A.fpr_at_tpr(list(range(1, 61)), [3.5, 4]) == 0.5


def test_ood_metric_inputs_refused():
    with pytest.raises(ValueError, match="scores_out is empty"):
        A.auroc([1.0], [])
    with pytest.raises(ValueError, match="non-finite"):
        A.fpr_at_tpr([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        A.fpr_at_tpr([1.0], [0.0], tpr=0)


# ----------------------------------------------------------------------------- calibration


def test_ece_on_a_known_reliability_table():
    conf = [0.9, 0.9, 0.85, 0.7, 0.7, 0.3]
    correct = [1, 1, 0, 1, 0, 1]
    table = A.reliability_table(conf, correct, n_bins=5)
    assert [r["count"] for r in table] == [0, 1, 0, 2, 3]
    assert [r["lo"] for r in table] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert [r["hi"] for r in table] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert table[0]["confidence"] is None and table[0]["accuracy"] is None
    assert (table[4]["confidence"], table[4]["accuracy"]) == pytest.approx((2.65 / 3, 2 / 3))
    assert (table[3]["confidence"], table[3]["accuracy"]) == pytest.approx((0.7, 0.5))
    # 3/6 * |2/3 - 0.88333| + 2/6 * |0.5 - 0.7| + 1/6 * |1 - 0.3|
    assert A.ece(conf, correct, n_bins=5) == pytest.approx(0.5 * (2.65 / 3 - 2 / 3) + 0.2 / 3 + 0.7 / 6)
    assert A.ece(conf, correct, n_bins=5) == pytest.approx(0.2916666667)


def test_ece_fifteen_bins_and_bin_edges():
    # bins (b/15, (b+1)/15]: 1.0 in the last, 0.5 in bin 7, 0 in the first
    conf = np.array([1.0, 1.0, 0.5, 0.5, 0.0])
    correct = np.array([True, False, False, False, False])
    table = A.reliability_table(conf, correct)
    assert len(table) == 15 and table[0]["lo"] == 0.0 and table[-1]["hi"] == 1.0
    assert [r["count"] for r in table] == [1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    # |0.5 - 1| * 2/5 + |0 - 0.5| * 2/5 + |0 - 0| * 1/5
    assert A.ece(conf, correct) == pytest.approx(0.4)
    # a confidence on an edge belongs to the bin it closes
    assert A.reliability_table([2 / 15], [1])[1]["count"] == 1
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        A.ece([1.5], [1])
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        A.ece([0.5], [1], n_bins=0)


def test_calibration_from_logits():
    logits = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0], [0.0, math.log(3.0)]])
    # confidences 0.9, 0.5, 0.75; predictions 0, 0 (first of a tie), 1
    out = A.calibration(logits, [0, 1, 1], n_bins=10)
    assert out["ece"] == pytest.approx((0.1 + 0.5 + 0.25) / 3)
    assert sum(r["count"] for r in out["table"]) == 3


# ----------------------------------------------------------------------------- probe


def _blobs(n_per_class, dim, classes, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 4
    x = torch.cat([centres[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def test_linear_probe_separable_and_deterministic():
    x_tr, y_tr = _blobs(40, 6, 3, seed=1)
    x_te, y_te = _blobs(20, 6, 3, seed=2)
    acc = A.linear_probe(x_tr, y_tr, x_te, y_te, epochs=30, seed=0)
    assert acc == 1.0
    # same seed, same answer; labels that carry no information stay near chance
    y_rand = torch.randint(0, 3, y_tr.shape, generator=torch.Generator().manual_seed(5))
    a1 = A.linear_probe(x_tr, y_rand, x_te, y_te, epochs=5, seed=3)
    a2 = A.linear_probe(x_tr, y_rand, x_te, y_te, epochs=5, seed=3)
    assert a1 == a2 and a1 < 0.8
    with pytest.raises(ValueError, match="train features have 6 dimensions but test features 5"):
        A.linear_probe(x_tr, y_tr, x_te[:, :5], y_te)


# ----------------------------------------------------------------------------- summary and report


def test_summary_on_fixed_logits():
    ood = torch.tensor([[0.0, 0.0, 0.5], [1.0, 1.0, 1.0]])
    summary, raw = A.analyze(Z, T, ood_logits=ood, n_bins=15)
    assert summary == A.summarize(Z, T, ood_logits=ood)
    assert summary["n"] == 3 and summary["num_classes"] == 3
    assert summary["accuracy"] == pytest.approx(200 / 3)  # rows 1, 2 right; row 3 wrong
    assert raw["margins"].tolist() == [1.0, 0.5, -3.0]
    m = summary["margin"]
    assert (m["mean"], m["median"], m["min"], m["max"]) == pytest.approx((-0.5, 0.5, -3.0, 1.0))
    assert m["negative_pct"] == pytest.approx(100 / 3)
    data = summary["energy"]["data"]
    assert data["target_mean"] == pytest.approx(-(2 + 3 + 1) / 3)  # E(x, y) = -z_y
    assert data["non_target_mean"] == pytest.approx(-((1 + 0) / 2 + (0 + 2.5) / 2 + (-1 + 4) / 2) / 3)
    assert data["min_mean"] == pytest.approx(-3.0)
    assert data["free_mean"] == pytest.approx(float(A.free_energy(Z).mean()))
    per_class = summary["energy_per_class"]
    assert per_class["count"] == [2, 1, 0]
    assert per_class["target"][:2] == pytest.approx([-(2 + 1) / 2, -3.0]) and per_class["target"][2] is None
    assert per_class["other"] == pytest.approx([0.0, -(1 - 1) / 2, -(0 + 2.5 + 4) / 3])
    # OOD: max logits in [2, 3, 4], out [0.5, 1] -> perfectly separated by min_energy
    assert summary["ood"]["n"] == 2
    assert summary["ood"]["min_energy"] == {"auroc": 100.0, "fpr95": 0.0}
    assert summary["energy"]["ood"]["min_mean"] == pytest.approx(-0.75)
    assert set(summary["ood"]) == {"n", *A.OOD_SCORES}
    assert summary["probe"] is None
    json.dumps(summary, allow_nan=False)  # JSON-able


def test_summary_with_probe_and_bad_input():
    x_tr, y_tr = _blobs(30, 4, 3, seed=1)
    x_te, y_te = _blobs(10, 4, 3, seed=2)
    logits = torch.nn.functional.one_hot(y_te, 3).float() * 3
    summary = A.summarize(logits, y_te, features=x_te, probe=(x_tr, y_tr), probe_kwargs={"epochs": 20})
    assert summary["probe"] == {"accuracy": 100.0, "n_train": 90, "n_test": 30}
    with pytest.raises(ValueError, match="probe needs the test features"):
        A.summarize(logits, y_te, probe=(x_tr, y_tr))
    with pytest.raises(ValueError, match="ood_logits have 4 classes but logits have 3"):
        A.summarize(logits, y_te, ood_logits=torch.zeros(2, 4))


def _two_models():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    out = {}
    for name, scale in (("CE", 1.0), ("EL", 3.0)):
        z = torch.randn(300, 4, generator=g) + scale * torch.nn.functional.one_hot(y, 4)
        zo = torch.randn(120, 4, generator=g) * 0.5
        out[name] = A.analyze(z, y, ood_logits=zo)
    return out


def test_write_report_files(tmp_path):
    from matplotlib.image import imread

    models = _two_models()
    summaries = {k: v[0] for k, v in models.items()}
    raw = {k: v[1] for k, v in models.items()}
    written = A.write_report(summaries, tmp_path / "report", raw=raw, meta={"ood": "toy"})
    assert set(written) == set(A.REPORT_FILES)
    for key, path in written.items():
        assert path == tmp_path / "report" / A.REPORT_FILES[key] and path.stat().st_size > 0
        if path.suffix == ".png":
            image = imread(path)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
            assert image.std() > 0.01, f"{path.name} is blank"
    back = json.loads(written["json"].read_text())
    assert back["models"] == json.loads(json.dumps(summaries)) and back["meta"] == {"ood": "toy"}
    md = written["markdown"].read_text()
    assert md.startswith("| measurement | CE | EL |")
    assert "| AUROC min_energy (%) | " in md and "| ECE (%) | " in md
    row = next(line for line in md.splitlines() if line.startswith("| accuracy (%)"))
    assert row == f"| accuracy (%) | {summaries['CE']['accuracy']:.2f} | {summaries['EL']['accuracy']:.2f} |"
    # never overwritten silently
    with pytest.raises(A.ReportError, match="refusing to overwrite .*report.json.*--force"):
        A.write_report(summaries, tmp_path / "report", raw=raw)
    # force, without raw: the histograms are not written (and the stale ones are removed)
    written = A.write_report(summaries, tmp_path / "report", force=True)
    assert set(written) == {"json", "markdown", "energy_per_class", "reliability"}
    assert not (tmp_path / "report" / "margins.png").exists()
    assert not (tmp_path / "report" / "ood_scores.png").exists()


def test_markdown_without_ood_has_no_ood_rows():
    summary = A.summarize(Z, T)
    md = A.render_markdown({"only": summary})
    assert "AUROC" not in md and "probe" not in md
    assert "| margin mean | -0.50 |" in md


# ----------------------------------------------------------------------------- writing the report (issue 16)


def test_check_out_dir_creates_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "report"
    assert A.check_out_dir(out) == out and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone too
    (tmp_path / "file").write_text("x")
    with pytest.raises(A.ReportError, match=r"^--out .*/file/report: cannot be created, .*/file is not a folder$"):
        A.check_out_dir(tmp_path / "file" / "report")
    with pytest.raises(A.ReportError, match=r"^--dir .*/file: exists and is not a folder$"):
        A.check_out_dir(tmp_path / "file", "--dir")


def test_write_report_is_all_or_nothing(tmp_path):
    """Extra files go with the report; a folder in the place of a plot is found before anything is written
    (it was an IsADirectoryError traceback after report.json and report.md had been written)."""
    models = _two_models()
    summaries = {k: v[0] for k, v in models.items()}
    raw = {k: v[1] for k, v in models.items()}
    out = tmp_path / "report"
    seen = {}

    def extra(written):
        seen.update(written)
        return {"summary.json": json.dumps({"files": sorted(written)}) + "\n"}

    written = A.write_report(summaries, out, raw=raw, extra=extra)
    assert set(seen) == set(A.REPORT_FILES) and written["summary.json"] == out / "summary.json"
    assert json.loads((out / "summary.json").read_text()) == {"files": sorted(A.REPORT_FILES)}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "margins.png").unlink()
    (out / "margins.png").mkdir()
    with pytest.raises(A.ReportError, match=r"margins.png is a folder, where the report writes a file"):
        A.write_report(summaries, out, raw=raw, force=True)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != "margins.png"}


# ----------------------------------------------------------------------------- long-tailed: shot groups

# training counts -> groups (many: > 100, medium: 20-100, few: < 20), by hand
COUNTS = [150, 101, 100, 50, 20, 19, 0]
GROUPS = ["many", "many", "medium", "medium", "medium", "few", "few"]
# evaluation: class 0 3/4 right, class 1 0/2, class 2 1/1, class 3 absent, class 4 1/3, class 5 2/2, class 6 absent
TARGET = [0, 0, 0, 0, 1, 1, 2, 4, 4, 4, 5, 5]
PRED = [0, 0, 0, 3, 0, 2, 2, 4, 0, 1, 5, 5]


def test_shot_groups_by_hand():
    assert A.shot_groups(COUNTS) == GROUPS
    assert A.shot_groups(np.array(COUNTS)) == GROUPS and A.shot_groups(torch.tensor(COUNTS)) == GROUPS
    assert A.shot_groups(COUNTS, many=50, few=1) == ["many", "many", "many", "medium", "medium", "medium", "few"]
    assert A.SHOT_GROUPS == ("many", "medium", "few")


def test_shot_accuracy_by_hand():
    """All: 7 of 12 right; each group the mean of its classes' accuracies (Kang et al.'s shot_acc): many
    (75 + 0) / 2, medium (100 + 100/3) / 2 (class 3 has no evaluation image), few 100 (class 6 neither)."""
    expected = {"all": 700 / 12, "many": 37.5, "medium": (100 + 100 / 3) / 2, "few": 100.0}
    got = A.shot_accuracy(PRED, TARGET, COUNTS)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    logits = torch.nn.functional.one_hot(torch.tensor(PRED), 7).float() * 3.0 - 1.0
    assert A.shot_accuracy(logits, torch.tensor(TARGET), COUNTS) == got
    assert A.shot_accuracy(logits.reshape(3, 4, 7), np.array(TARGET).reshape(3, 4), COUNTS) == got


def test_shot_accuracy_empty_group_is_none():
    # class 0: 1 of 2 right, class 1: 1 of 1 (both many-shot); class 2 (few) is never evaluated, no class is medium
    got = A.shot_accuracy([0, 1, 1], [0, 1, 0], [500, 200, 5])
    assert got == {"all": pytest.approx(200 / 3), "many": 75.0, "medium": None, "few": None}


def test_shot_accuracy_equals_kangs_shot_acc_on_random_data():
    """Kang et al.'s shot_acc (classifier-balancing, utils.py), written out here as they wrote it."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 300, size=40)
    labels = rng.integers(0, 40, size=500)
    preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 40, size=500))
    many, median, low = [], [], []
    for c in np.unique(labels):
        acc = (preds[labels == c] == c).sum() / (labels == c).sum()
        n = counts[c]
        (many if n > 100 else low if n < 20 else median).append(acc)
    got = A.shot_accuracy(preds, labels, counts)
    assert got["many"] == pytest.approx(100 * np.mean(many))
    assert got["medium"] == pytest.approx(100 * np.mean(median))
    assert got["few"] == pytest.approx(100 * np.mean(low))
    assert got["all"] == pytest.approx(100 * np.mean(preds == labels))


@pytest.mark.parametrize("call, message", [
    (lambda: A.shot_groups([10, -1]), "train_counts must be >= 0, got -1 for class 1"),
    (lambda: A.shot_groups([1.5, 2]), "train_counts must hold integers, got non-integer values"),
    (lambda: A.shot_groups([]), "train_counts is empty: one count per class is needed"),
    (lambda: A.shot_groups(["a"]), "train_counts must hold integers, got dtype <U1"),
    (lambda: A.shot_groups([10], many=10, few=20), "few (20) must be at most many + 1 (11): the groups would overlap"),
    (lambda: A.shot_groups([10], many=True), "many must be an integer >= 0, got True"),
    (lambda: A.shot_groups([10], few=-1), "few must be an integer >= 0, got -1"),
    (lambda: A.shot_accuracy(PRED, TARGET[:-1], COUNTS), "target has 11 entries but logits_or_pred has 12 examples"),
    (lambda: A.shot_accuracy(PRED, [7] + TARGET[1:], COUNTS), "target holds classes outside [0, 6] (min 0, max 7)"),
    (lambda: A.shot_accuracy([-1] + PRED[1:], TARGET, COUNTS),
     "logits_or_pred (predicted classes) holds classes outside [0, 6] (min -1, max 5)"),
    (lambda: A.shot_accuracy(torch.zeros(12, 5), TARGET, COUNTS),
     "logits_or_pred has 5 classes but train_counts has 7"),
    (lambda: A.shot_accuracy([], [], COUNTS), "target is empty: no examples to evaluate"),
    (lambda: A.shot_accuracy(torch.tensor(1.0), [0], COUNTS),
     "logits_or_pred must be [N, C] logits or N predicted classes, got a scalar"),
])
def test_shot_functions_refuse_bad_input(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
