import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # spec_formulas

from encouraging_loss.tools import data as el_data  # noqa: E402


def shared_data_dir() -> Path:
    """The data the tests use: the first complete one of $EL_SHARED_DATA, ../shared/data, the cache
    (``python -m encouraging_loss.tools.data where``); the first place looked in when none is complete."""
    return el_data.find_data(checkout=ROOT) or el_data.data_dirs(ROOT)[0][1]


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

