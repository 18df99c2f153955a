"""The timm plugin's test fixtures: the two MNIST ImageFolders the training runs use, a copy to damage,
two finished runs, and the console logging that ``timm_el.train.main()`` sets up undone."""
import logging
import shutil
from pathlib import Path

import pytest

from timm_el import train as el_train

from timm_cli import FAST, TINY, run_cli


@pytest.fixture(scope="session")
def mnist_folder(mnist_folder_of) -> Path:
    """``train/<digit>/*.png`` (the first 60 per digit of MNIST train), ``val/<digit>/*.png`` (the first 20
    of MNIST test): the ``FAST`` recipe's data."""
    return mnist_folder_of(60, 20)


@pytest.fixture(scope="session")
def tiny_source(mnist_folder_of) -> Path:
    """The digits 0, 1, 2: ``train/`` the first 12 of each in MNIST train, ``val/`` the next 4 (numbered on):
    the ``TINY`` recipe's data."""
    return mnist_folder_of(12, 4, classes=3, val_from="train")


@pytest.fixture
def tiny(tiny_source, tmp_path) -> Path:
    """A copy of the tiny folder this test may damage."""
    return Path(shutil.copytree(tiny_source, tmp_path / "data"))


@pytest.fixture(scope="session")
def el_run(mnist_folder, tmp_path_factory):
    """Two epochs of ``FAST`` with the Encouraging Loss: ``(run directory, process)``. Tests copy it before
    resuming it."""
    out = tmp_path_factory.mktemp("el_out")
    proc = run_cli(mnist_folder, *FAST, "--loss", "encouraging", "--epochs", "2",
                   "--output", out, "--experiment", "el", cwd=out)
    return out / "el", proc


@pytest.fixture(scope="session")
def finished_run(tiny_source, tmp_path_factory) -> Path:
    """A finished 1-epoch ``TINY`` run (to copy and resume)."""
    out = tmp_path_factory.mktemp("finished")
    run_cli(tiny_source, *TINY, "--epochs", "1", "--output", out, "--experiment", "run", cwd=out)
    return out / "run"


@pytest.fixture
def restore_logging():
    """Undo the console logging that ``main()`` sets up in this process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    el_train._logging_ready = False
