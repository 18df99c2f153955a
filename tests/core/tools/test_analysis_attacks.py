"""encouraging_loss.tools.analysis, the attack parts (issue 19; the paper's section 5.4, Tables 7 and 11,
Fig. 7 and 8): accuracy and margins under attack per eps, the input-gradient zero fraction (gradient
masking), the attacks section of the Markdown report and the two attack plots."""
import json
import math

import numpy as np
import pytest
import torch

from encouraging_loss.tools import analysis as A


def _attacked(n=8, v=4):
    """Logits of ``n`` examples at three eps: all right, half right, none right (known margins)."""
    t = torch.arange(n) % v
    eye = torch.nn.functional.one_hot(t, v).float()
    right = 3.0 * eye  # margin 3 each
    half = right.clone()
    half[: n // 2] = -2.0 * eye[: n // 2]  # margin -2 on the first half
    wrong = -1.0 * eye  # margin -1 each
    return t, [right, half, wrong]


def test_attack_curve_accuracy_and_margins():
    t, logits = _attacked()
    summary, margins = A.attack_curve([0, 0.1, 0.3], logits, t, norm="Linf")
    assert summary == {"norm": "Linf", "samples": 8, "subset": False, "eps": [0.0, 0.1, 0.3],
                       "accuracy": [100.0, 50.0, 0.0], "margin_mean": [3.0, 0.5, -1.0]}
    assert set(margins) == {0.0, 0.1, 0.3}
    np.testing.assert_array_equal(margins[0.1], [-2.0] * 4 + [3.0] * 4)
    summary, _ = A.attack_curve((1, 3), logits[:2], t, norm="L2", subset=True)
    assert summary["subset"] is True and summary["norm"] == "L2" and summary["eps"] == [1.0, 3.0]
    json.dumps(summary, allow_nan=False)  # the report's JSON takes it as it is


@pytest.mark.parametrize("eps, logits, norm, message", [
    ([0, 0.1], 1, "Linf", "one logits array per eps, got 2 eps and 1"),
    ([0, -0.1], 2, "Linf", r"eps must be finite numbers >= 0, got -0.1"),
    ([0, math.nan], 2, "Linf", r"eps must be finite numbers >= 0, got nan"),
    ([0, 0.1], 2, "L1", "norm must be 'Linf' or 'L2'"),
])
def test_attack_curve_refuses_bad_input(eps, logits, norm, message):
    t, zs = _attacked()
    with pytest.raises(ValueError, match=message):
        A.attack_curve(eps, zs[:logits], t, norm=norm)


def test_attack_curve_refuses_logits_of_different_shapes():
    t, zs = _attacked()
    with pytest.raises(ValueError, match="same shape"):
        A.attack_curve([0, 1], [zs[0], zs[1][:4]], t, norm="L2")


def test_zero_gradient_fraction():
    g = torch.zeros(4, 1, 2, 2)
    g[1, 0, 1, 1] = 1e-38  # tiny is not zero
    g[3, 0, 0, 0] = -2.0
    assert A.zero_gradient_fraction(g) == 0.5
    assert A.zero_gradient_fraction(torch.tensor([0.0, 0.0, 0.0])) == 1.0  # one value per example
    assert A.zero_gradient_fraction(np.array([[0.5], [0.1]])) == 0.0
    with pytest.raises(ValueError, match="no examples"):
        A.zero_gradient_fraction(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-finite"):
        A.zero_gradient_fraction(torch.tensor([[math.nan], [0.0]]))


def _with_attacks(masked: float = 0.0):
    """Two toy models' summaries and raws with attack results (EL's logits steeper)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (40,), generator=g)
    summaries, raws = {}, {}
    for name, scale in (("CE", 1.0), ("EL", 3.0)):
        z = torch.randn(40, 4, generator=g) + scale * torch.nn.functional.one_hot(y, 4)
        summary, raw = A.analyze(z, y)
        attacks, margins = {}, {}
        for attack, norm, grid, n in (("fgsm", "Linf", [0, 0.1, 0.3], 40), ("pgd_l2", "L2", [0, 0.3, 1, 3, 100], 40),
                                      ("autoattack", "Linf", [0, 0.1, 0.3], 10)):
            zs = [z[:n] - shift * torch.nn.functional.one_hot(y[:n], 4) for shift in np.linspace(0, 2 * scale,
                                                                                                  len(grid))]
            attacks[attack], per_eps = A.attack_curve(grid, zs, y[:n], norm=norm, subset=n < 40)
            middle = grid[len(grid) // 2]
            margins[attack] = {"eps": middle, "margins": per_eps[middle]}
        summary["attacks"] = attacks
        summary["input_gradient"] = {"samples": 40, "zero_fraction": masked if name == "EL" else 0.0}
        raw["attack_margins"] = margins
        summaries[name], raws[name] = summary, raw
    return summaries, raws


def test_markdown_attacks_section():
    summaries, _ = _with_attacks()
    md = A.render_markdown(summaries)
    plain = A.render_markdown({k: {kk: vv for kk, vv in v.items() if kk not in ("attacks", "input_gradient")}
                               for k, v in summaries.items()})
    assert md.startswith(plain)  # the measurement table as before, the attacks after it
    lines = md.splitlines()
    assert "| attack | norm | eps | samples | CE | EL |" in lines
    ce, el = summaries["CE"]["attacks"]["fgsm"], summaries["EL"]["attacks"]["fgsm"]
    assert f"| fgsm | Linf | 0.1 | 40 | {ce['accuracy'][1]:.2f} | {el['accuracy'][1]:.2f} |" in lines
    aa = summaries["EL"]["attacks"]["autoattack"]
    assert any(line.startswith("| autoattack | Linf | 0.3 | 10 (subset) | ") and
               line.endswith(f" | {aa['accuracy'][2]:.2f} |") for line in lines)
    assert any(line.startswith("| pgd_l2 | L2 | 100 | 40 | ") for line in lines)
    assert "| zero fraction | 0.000 | 0.000 |" in lines
    assert "Gradient masking" not in md
    assert "AUROC" not in md  # no OOD rows appear with the attacks


def test_markdown_warns_of_gradient_masking():
    summaries, _ = _with_attacks(masked=0.75)
    md = A.render_markdown(summaries)
    assert "| zero fraction | 0.000 | 0.750 |" in md.splitlines()
    note = next(line for line in md.splitlines() if line.startswith("Gradient masking"))
    assert "EL (75.0%)" in note and "CE" not in note and "AutoAttack" in note


def test_write_report_attack_plots(tmp_path):
    from matplotlib.image import imread

    summaries, raws = _with_attacks()
    out = tmp_path / "report"
    written = A.write_report(summaries, out, raw=raws)
    assert set(written) == set(A.REPORT_FILES) - {"ood_scores"} | set(A.ATTACK_REPORT_FILES)
    for key in A.ATTACK_REPORT_FILES:
        image = imread(written[key])
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0.01, key
    back = json.loads(written["json"].read_text())
    assert back["models"]["EL"]["attacks"]["autoattack"] == json.loads(json.dumps(
        summaries["EL"]["attacks"]["autoattack"]))
    assert back["models"]["CE"]["input_gradient"] == {"samples": 40, "zero_fraction": 0.0}
    # an existing attack plot is not overwritten silently
    (out / "report.json").unlink()
    with pytest.raises(A.ReportError, match="refusing to overwrite .*attacks.png"):
        A.write_report(summaries, out, raw=raws)
    # a report without attacks removes the stale attack plots; without raw, no margin histograms
    for s in summaries.values():
        s.pop("attacks"), s.pop("input_gradient")
    written = A.write_report(summaries, out, raw=raws, force=True)
    assert not (out / "attacks.png").exists() and not (out / "attack_margins.png").exists()
    assert "attacks" not in written


def test_attack_plots_without_raw_margins(tmp_path):
    summaries, _ = _with_attacks()
    written = A.write_report(summaries, tmp_path / "r")
    assert "attacks" in written and "attack_margins" not in written
