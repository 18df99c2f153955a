"""Fixtures every test folder may use: the shared data, and the small data sets built from it once per
session (an IWSLT14 slice binarized by fairseq, an ImageFolder of MNIST digits)."""
import json
from pathlib import Path

import pytest

from encouraging_loss.tools import data as el_data

from helpers import ROOT, make_iwslt14_slice, write_mnist_folder


def pytest_sessionstart(session):
    # CI sets EL_REQUIRE_DATA=1: missing data fails the run at once instead of skipping tests.
    if el_data.require_data() and el_data.find_data(checkout=ROOT) is None:
        pytest.exit(f"EL_REQUIRE_DATA is set but {el_data.missing_data_message(ROOT)}", returncode=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the test data (``<root>/<dataset>/<file>``); skips the test when there is none."""
    path = el_data.find_data(checkout=ROOT)
    if path is None:
        message = el_data.missing_data_message(ROOT)
        if el_data.require_data():
            pytest.fail(f"EL_REQUIRE_DATA is set but {message}", pytrace=False)
        pytest.skip(message)
    return path



@pytest.fixture(scope="session")
def iwslt14_slice(shared_data, tmp_path_factory):
    """``iwslt14_slice(train=, valid=, test=, prep=None)``: the first pairs of the shared IWSLT14 De-En copy,
    BPE text in ``text/`` and fairseq-binarized in ``bin/`` (``helpers.make_iwslt14_slice``), with ``prep``
    (a dict) written as the ``prep.json`` the data preparation would write. Built once per session and set of
    arguments: a test that changes it works on a copy."""
    built = {}

    def build(train: int, valid: int, test: int, prep: dict = None) -> Path:
        key = (train, valid, test, json.dumps(prep, sort_keys=True))
        if key not in built:
            out = make_iwslt14_slice(shared_data, tmp_path_factory.mktemp("iwslt14_slice") / "prep", train, valid, test)
            if prep is not None:
                (out / "prep.json").write_text(json.dumps(prep))
            built[key] = out
        return built[key]

    return build


@pytest.fixture(scope="session")
def mnist_folder_of(shared_data, tmp_path_factory):
    """``mnist_folder_of(train=, val=, classes=10, val_from="test")``: an ImageFolder of MNIST digits as PNG files
    (``helpers.write_mnist_folder``), built once per session and set of arguments: a test that changes it works
    on a copy."""
    built = {}

    def build(train: int, val: int, classes: int = 10, val_from: str = "test") -> Path:
        key = (train, val, classes, val_from)
        if key not in built:
            built[key] = write_mnist_folder(shared_data, tmp_path_factory.mktemp("mnist_folder"), train, val,
                                            classes, val_from)
        return built[key]

    return build
