"""The fairseq_el package: ``python -m fairseq_el --user-dir`` (at once, without importing fairseq or torch),
and importing it registers the plugin."""
import subprocess
import sys


def test_user_dir_entry_point_prints_the_package_dir():
    out = subprocess.run([sys.executable, "-m", "fairseq_el", "--user-dir"], capture_output=True, text=True, check=True)
    import fairseq_el

    assert out.stdout.strip() == fairseq_el.user_dir()


def test_user_dir_prints_at_once_without_importing_fairseq():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fairseq_el", "--user-dir"],
                          capture_output=True, text=True, check=True)
    import fairseq_el

    assert proc.stdout == fairseq_el.user_dir() + "\n"
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "fairseq_el" in imported
    assert not [m for m in imported if m == "fairseq" or m.startswith("fairseq.")], "fairseq was imported"
    assert not [m for m in imported if m == "torch"], "torch was imported"
    assert not [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


def test_plugin_package_registers_when_imported():
    """Imported the ordinary way (fairseq's --user-dir, a script), the package registers the criterion."""
    code = ("import fairseq_el; from fairseq.criterions import CRITERION_REGISTRY; "
            "print('encouraging_label_smoothed_cross_entropy' in CRITERION_REGISTRY, "
            "fairseq_el.EncouragingLabelSmoothedCrossEntropyCriterion.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "EncouragingLabelSmoothedCrossEntropyCriterion"]
