"""timm_el.attacks (evaluation) and ``el-analyze --attack`` (issue 19; the paper's section 5.4, Tables 7 and
11, Fig. 7 and 8), on a small CNN trained here on MNIST (TorchAttacks' demo CNN, 600 images, 3 epochs,
about 70% accuracy) with real torchattacks.

Checked: every attack stays within its norm bound and [0, 1] and lowers the accuracy; eps 0 is the clean
accuracy; the numbers are the same whatever ran before (seeded per batch inside fork_rng); the input-gradient
zero fraction is 1 on a saturated model and 0 on a normal one, where FGSM fails and APGD-DLR does not;
el-analyze writes the interface's JSON, the Markdown table and the two plots, repeats its numbers, attacks a
seeded subset with --aa-max-samples, and refuses bad flags in one line.
"""
import argparse
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("timm")
pytest.importorskip("torchattacks")
import timm  # noqa: E402

from encouraging_loss.tools.analysis import ATTACK_REPORT_FILES  # noqa: E402
from timm_el import analyze as A  # noqa: E402
from timm_el import attacks as T  # noqa: E402
from timm_el.data import load_mnist  # noqa: E402

from helpers import ROOT, command_env  # noqa: E402

MEAN, STD = (0.1307,), (0.3081,)  # trained on normalised images: the attacks must undo it
EPS = {"Linf": 0.15, "L2": 2.0}


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """``(model taking [0, 1] images, test images [48], labels, checkpoint, saturated checkpoint)``."""
    x, y = load_mnist(shared_data / "mnist", "train", limit=600)
    x, y = torch.tensor(x).float().div(255).unsqueeze(1), torch.tensor(y).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = timm.create_model("mnist_ta_cnn", num_classes=10)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(3):
            order = torch.randperm(len(y))
            for start in range(0, len(y), 50):
                idx = order[start:start + 50]
                loss = F.cross_entropy(net((x[idx] - MEAN[0]) / STD[0]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    xt, yt = load_mnist(shared_data / "mnist", "test", limit=48)
    xt, yt = torch.tensor(xt).float().div(255).unsqueeze(1), torch.tensor(yt).long()
    folder = tmp_path_factory.mktemp("attack_ckpt")
    args = argparse.Namespace(model="mnist_ta_cnn", num_classes=10, in_chans=1, mean=list(MEAN), std=list(STD))
    torch.save({"state_dict": net.state_dict(), "args": args}, folder / "normal.pth.tar")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.weight"] *= 1e4  # logits 10^4 times larger: a saturated softmax, as a steep bonus can give
    state["fc.bias"] *= 1e4
    torch.save({"state_dict": state, "args": args}, folder / "saturated.pth.tar")
    return T.NormalizedModel(net, MEAN, STD).eval(), xt, yt, folder / "normal.pth.tar", folder / "saturated.pth.tar"


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------- the attacks


@pytest.mark.parametrize("name, n", [("fgsm", 48), ("pgd", 48), ("pgd_l2", 48), ("apgd_dlr", 48),
                                     ("apgd_dlr_l2", 48), ("autoattack", 3), ("autoattack_l2", 3)])
def test_attack_respects_its_norm_and_lowers_accuracy(trained, name, n):
    model, x, y, _, _ = trained
    x, y = x[:n], y[:n]
    norm = T.ATTACKS[name].norm
    eps = EPS[norm] * (2 if T.ATTACKS[name].kind == "AutoAttack" else 1)  # AutoAttack: all broken at once (fast)
    attack = T.make_attack(name, model, eps, steps=5, seed=0)
    adv = T.attack_batch(attack, x, y, eps=eps, norm=norm, seed=0)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    size = T.perturbation_norms(adv, x, norm)
    if norm == "Linf":
        assert float(size.max()) <= eps + 1e-6
    else:
        assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(size.max()) > 0.5 * eps  # it did move the images
    clean, attacked = accuracy(model, x, y), accuracy(model, adv, y)
    assert clean >= 0.6 or n < 10, clean
    assert attacked < clean - 0.2 or (n < 10 and attacked < clean), (clean, attacked)


def test_project_enforces_the_ball_and_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=g)
    far = x + 3 * torch.randn(5, 1, 4, 4, generator=g)
    linf = T.project(far, x, 0.1, "Linf")
    assert float(T.perturbation_norms(linf, x, "Linf").max()) <= 0.1 + 1e-6
    l2 = T.project(far, x, 0.5, "L2")
    assert float(T.perturbation_norms(l2, x, "L2").max()) <= 0.5 * (1 + 1e-5)
    for p in (linf, l2):
        assert float(p.min()) >= 0 and float(p.max()) <= 1
    inside = (x + 0.01).clamp(0, 1)
    assert torch.equal(T.project(inside, x, 0.1, "Linf"), inside)
    with pytest.raises(ValueError, match="norm must be"):
        T.project(far, x, 0.1, "L1")


def test_attack_refuses_normalised_images(trained):
    model, x, y, _, _ = trained
    with pytest.raises(ValueError, match=r"attack inputs must be images in \[0, 1\]"):
        T.attack_batch(T.make_attack("fgsm", model, 0.1), (x - MEAN[0]) / STD[0], y, eps=0.1, norm="Linf")


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_l2", "apgd_dlr", "autoattack_l2"])
def test_eps_zero_is_the_clean_accuracy(trained, name):
    model, x, y, _, _ = trained
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    summary, margins = T.evaluate_attack(model, batches, name, [0.0], total=len(y))
    assert summary["eps"] == [0.0] and summary["samples"] == len(y)
    assert summary["accuracy"][0] == pytest.approx(100 * accuracy(model, x, y), abs=1e-9)
    with torch.no_grad():
        clean_margins = (model(x).gather(1, y[:, None]).squeeze(1)
                         - model(x).scatter(1, y[:, None], -1e9).max(1).values)
    assert margins[0.0] == pytest.approx(clean_margins.double().numpy(), abs=1e-5)


def test_evaluate_attack_is_deterministic(trained):
    model, x, y, _, _ = trained
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    grid = [0.0, 0.2]

    def once(seed):
        return T.evaluate_attack(model, batches, "pgd", grid, steps=3, seed=seed)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, m1 = once(0)
    assert torch.equal(torch.get_rng_state(), before)  # the attacks leave the caller's generator alone
    torch.rand(1000)  # the caller's random state differs: the numbers must not
    second, m2 = once(0)
    assert first == second and all((m1[e] == m2[e]).all() for e in grid)
    other, m3 = once(7)
    assert (m1[0.2] != m3[0.2]).any()  # the seed does matter (PGD's random start)
    assert first["accuracy"][1] < first["accuracy"][0]


def test_evaluate_attack_uses_the_cache(trained):
    model, x, y, _, _ = trained
    batches = [(x[:8], y[:8])]
    fake = torch.nn.functional.one_hot((y[:8] + 1) % 10, 10).float()  # every example wrong
    cache = {0.1: (fake, y[:8])}
    summary, _ = T.evaluate_attack(model, batches, "fgsm", [0.0, 0.1], cache=cache)
    assert summary["accuracy"][1] == 0.0 and summary["accuracy"][0] == 100 * accuracy(model, x[:8], y[:8])
    assert set(cache) == {0.0, 0.1} and torch.equal(cache[0.0][1], y[:8])  # the new eps stored


class Scaled(nn.Module):
    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


def test_zero_gradient_fraction_finds_a_saturated_softmax(trained):
    model, x, _, _, _ = trained
    with torch.no_grad():
        y = model(x).argmax(1)  # every example right: only saturation can make the gradient vanish
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    assert T.input_gradient_zero_fraction(model, batches) == (48, 0.0)
    saturated = Scaled(model, 1e6).eval()
    assert T.input_gradient_zero_fraction(saturated, batches) == (48, 1.0)
    # the masking it warns of: FGSM cannot move the images, APGD with the scale-free DLR loss can
    fgsm, _ = T.evaluate_attack(saturated, batches, "fgsm", [0.2])
    dlr, _ = T.evaluate_attack(saturated, batches, "apgd_dlr", [0.2], steps=5)
    assert fgsm["accuracy"] == [100.0] and dlr["accuracy"][0] < 50.0


# ----------------------------------------------------------------------------- el-analyze --attack


def _common(shared_data, out):
    return ["--data-dir", str(shared_data / "mnist"), "--max-samples", "16", "-b", "8", "--out", str(out)]


def test_cli_attacks_report(trained, shared_data, tmp_path, capsys):
    from matplotlib.image import imread

    _, _, _, normal, saturated = trained
    out = tmp_path / "r"
    assert A.main([str(normal), str(saturated), "--names", "CE", "SAT", *_common(shared_data, out),
                   "--attack", "fgsm,pgd,pgd_l2,apgd_dlr", "--eps", "0.3,0", "--eps-l2", "0,3",
                   "--attack-steps", "3", "--aa-max-samples", "5", "--margin-eps", "0.3", "3"]) == 0
    stdout, stderr = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    for name in ("CE", "SAT"):
        s = report["models"][name]
        assert list(s["attacks"]) == ["fgsm", "pgd", "pgd_l2", "apgd_dlr"]
        for attack, entry in s["attacks"].items():
            assert set(entry) == {"norm", "samples", "subset", "eps", "accuracy", "margin_mean"}
            assert entry["norm"] == T.ATTACKS[attack].norm and entry["subset"] is True
            assert entry["eps"] == ([0.0, 0.3] if entry["norm"] == "Linf" else [0.0, 3.0])  # sorted
            assert len(entry["accuracy"]) == len(entry["margin_mean"]) == 2
            assert entry["samples"] == (5 if attack == "apgd_dlr" else 16)
            if entry["samples"] == 16:  # eps 0 is the clean accuracy of the analysis, same images
                assert entry["accuracy"][0] == pytest.approx(s["accuracy"], abs=1e-9)
                assert entry["margin_mean"][0] == pytest.approx(s["margin"]["mean"], rel=1e-5)
        assert s["input_gradient"]["samples"] == 16
    ce, sat = report["models"]["CE"], report["models"]["SAT"]
    assert ce["attacks"]["pgd"]["accuracy"][1] < ce["accuracy"] - 20  # the attacks work on the trained model
    assert ce["input_gradient"]["zero_fraction"] == 0.0 and sat["input_gradient"]["zero_fraction"] >= 0.5
    assert sat["attacks"]["fgsm"]["accuracy"][1] > ce["attacks"]["fgsm"]["accuracy"][1]  # masked, not robust
    assert report["meta"]["attacks"]["margin_eps"] == {"Linf": 0.3, "L2": 3.0}
    assert report["meta"]["attacks"]["steps"] == 3 and report["meta"]["attacks"]["aa_max_samples"] == 5
    md = (out / "report.md").read_text()
    row = f"| pgd | Linf | 0.3 | 16 (subset) | {ce['attacks']['pgd']['accuracy'][1]:.2f} | "
    assert row in md and row in stdout
    assert "| apgd_dlr | Linf | 0.3 | 5 (subset) |" in md
    note = next(line for line in md.splitlines() if line.startswith("Gradient masking"))
    assert "SAT" in note and "CE (" not in note
    assert "CE pgd eps 0.3: 16/16 images, accuracy" in stderr and "on 5 images" in stderr
    for file in ATTACK_REPORT_FILES.values():
        image = imread(out / file)
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0.01, file
    assert not (out / A.CACHE_DIR).exists()  # the resume cache goes once the report is written
    # the same command (here: only PGD, one eps, one model) gives the same numbers
    again = tmp_path / "again"
    assert A.main([str(normal), "--names", "CE", *_common(shared_data, again), "--attack", "pgd",
                   "--eps", "0.3", "--attack-steps", "3"]) == 0
    capsys.readouterr()
    pgd = json.loads((again / "report.json").read_text())["models"]["CE"]["attacks"]["pgd"]
    assert pgd["accuracy"] == ce["attacks"]["pgd"]["accuracy"][1:]
    assert pgd["margin_mean"] == ce["attacks"]["pgd"]["margin_mean"][1:]


def test_cli_resumes_from_the_cache(trained, shared_data, tmp_path, capsys):
    """A run stopped after its attacks (here: the report cannot be written) leaves the finished (attack, eps)
    results in OUT/.attack-cache; the rerun takes them from there instead of attacking again."""
    _, _, _, normal, _ = trained
    out = tmp_path / "r"
    (out / "attack_margins.png").mkdir(parents=True)  # in the way of the report: the run fails at the end
    argv = [str(normal), "--names", "CE", *_common(shared_data, out), "--attack", "fgsm", "--eps", "0,0.2",
            "--force"]
    with pytest.raises(SystemExit):
        A.main(argv)
    assert "attack_margins.png is a folder" in capsys.readouterr().err
    files = sorted((out / A.CACHE_DIR).glob("CE-fgsm-*/eps-*.pt"))
    assert [f.name for f in files] == ["eps-0.0.pt", "eps-0.2.pt"]
    # what an earlier run found at eps 0.2, changed so that its use shows: every example wrong
    targets = torch.load(files[1], weights_only=True)["targets"]
    torch.save({"logits": F.one_hot((targets + 1) % 10, 10).float(), "targets": targets}, files[1])
    (out / "attack_margins.png").rmdir()
    assert A.main(argv) == 0
    _, stderr = capsys.readouterr()
    fgsm = json.loads((out / "report.json").read_text())["models"]["CE"]["attacks"]["fgsm"]
    assert "CE fgsm eps 0.2: 16 images, done before (cached)" in stderr
    assert "CE fgsm eps 0: 16/16 images" not in stderr  # eps 0 came from the cache too
    assert fgsm["accuracy"][1] == 0.0 and fgsm["accuracy"][0] > 0
    assert not (out / A.CACHE_DIR).exists()


def test_cli_autoattack_on_a_subset(trained, shared_data, tmp_path, capsys):
    _, _, _, normal, _ = trained
    out = tmp_path / "aa"
    assert A.main([str(normal), "--names", "CE", *_common(shared_data, out), "--attack", "autoattack",
                   "--eps", "0.3", "--aa-max-samples", "2"]) == 0
    capsys.readouterr()
    s = json.loads((out / "report.json").read_text())["models"]["CE"]
    aa = s["attacks"]["autoattack"]
    assert aa["samples"] == 2 and aa["subset"] is True and aa["eps"] == [0.3] and aa["accuracy"] == [0.0]


@pytest.mark.parametrize("flags, message", [
    (["--attack", "fgsm,cw"], "--attack: unknown attack 'cw' (valid: fgsm, pgd, pgd_l2, apgd_dlr, apgd_dlr_l2, "
                              "autoattack, autoattack_l2)"),
    (["--attack", ","], "--attack: no attack given"),
    (["--attack", "pgd", "--eps", "0,-0.1"], "--eps: eps must be finite numbers >= 0, got -0.1"),
    (["--attack", "pgd", "--eps", "nan"], "--eps: eps must be finite numbers >= 0, got nan"),
    (["--attack", "pgd_l2", "--eps-l2", "1,x"], "--eps-l2: 'x' is not a number"),
    (["--attack", "pgd", "--attack-steps", "0"], "--attack-steps must be an integer >= 1, got 0"),
    (["--attack", "autoattack", "--aa-max-samples", "0"], "--aa-max-samples must be an integer >= 1, got 0"),
    (["--attack", "pgd", "--attack-batch-size", "0"], "--attack-batch-size must be an integer >= 1, got 0"),
    (["--eps", "0.1"], "--eps needs --attack"),
    (["--aa-max-samples", "5"], "--aa-max-samples needs --attack"),
    (["--attack", "pgd", "--eps", "0,0.1", "--margin-eps", "0.2", "1"],
     "--margin-eps: 0.2 is not in the Linf grid --eps (0,0.1)"),
])
def test_cli_refuses_bad_attack_flags(trained, shared_data, tmp_path, capsys, flags, message):
    _, _, _, normal, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        A.main([str(normal), *_common(shared_data, tmp_path / "x"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"el-analyze: error: {message}"] or (len(err) == 1 and err[0].startswith(
        f"el-analyze: error: {message}")), err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_dlr_attacks_on_two_classes(mnist_folder_of, tmp_path, capsys):
    data = mnist_folder_of(1, 3, classes=2)
    net = timm.create_model("mnist_ta_cnn", num_classes=2)
    args = argparse.Namespace(model="mnist_ta_cnn", num_classes=2, in_chans=1)
    torch.save({"state_dict": net.state_dict(), "args": args}, tmp_path / "two.pth.tar")
    with pytest.raises(SystemExit):
        A.main([str(tmp_path / "two.pth.tar"), "--names", "B", "--data-dir", str(data), "--split", "val",
                "--attack", "fgsm,apgd_dlr", "--eps", "0,0.1", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "el-analyze: error: --attack (B): apgd_dlr needs a model of at least 3 classes (the DLR loss), this one "
        "has 2")


def test_cli_without_torchattacks_says_how_to_install(tmp_path, shared_data):
    code = ("import sys; sys.modules['torchattacks'] = None; from timm_el.analyze import main; "
            f"main(['x.pth', '--data-dir', {str(shared_data / 'mnist')!r}, '--attack', 'pgd', "
            f"'--out', {str(tmp_path / 'o')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=command_env(checkout_on_path=True), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "el-analyze: error: --attack: the attacks need torchattacks: pip install --no-deps torchattacks==3.5.1 "
        "(or bash scripts/install.sh)"]
    assert ROOT.is_dir()
