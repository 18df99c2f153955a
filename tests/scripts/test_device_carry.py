"""scripts/prepare_device_carry.sh: what a GPU machine without fairseq or a
network needs for scripts/gpu_check.sh (wheels for its Python, the
fairseq-fixed sdist, the in-place build helper, a binarized IWSLT14 slice).
Downloads from the package registry, as the script does."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("fairseq")

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "prepare_device_carry.sh"


def _run(out, **env):
    full = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=full, timeout=600)


def test_prepare_device_carry(shared_data, tmp_path):
    shared = tmp_path / "shared"
    (shared / "tools").mkdir(parents=True)
    (shared / "tools" / "fairseq_inplace_build.py").write_text("# the helper\n")
    (shared / "data").mkdir()
    (shared / "data" / "iwslt14-de-en").symlink_to(shared_data / "iwslt14-de-en")
    out = tmp_path / "carry"
    proc = _run(out, SHARED=str(shared), PY_VERSION="3.12")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    wheels = sorted(p.name for p in (out / "wheels").iterdir())
    assert [w.split("-")[0] for w in wheels] == ["antlr4_python3_runtime", "bitarray", "hydra_core", "omegaconf"]
    assert "-cp312-" in wheels[1] and wheels[2].startswith("hydra_core-1.3.2-") and "omegaconf-2.3.0-" in wheels[3]
    assert len(list(out.glob("fairseq_fixed-0.12.3.1.tar.gz"))) == 1
    assert (out / "fairseq_inplace_build.py").read_text() == "# the helper\n"
    for name in ("dict.de.txt", "dict.en.txt", "train.de-en.de.bin", "valid.de-en.en.idx", "test.de-en.de.bin"):
        assert (out / "data-bin" / name).stat().st_size > 0, name
    assert f"ready: {out}" in proc.stdout and not (tmp_path / "carry.tmp").exists()


def test_prepare_device_carry_names_what_is_missing(tmp_path):
    proc = _run(tmp_path / "carry", SHARED=str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert f"{tmp_path / 'nowhere'}/tools/fairseq_inplace_build.py not found (set SHARED=...)" in proc.stderr
    assert not (tmp_path / "carry").exists()
