import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # spec_formulas


def shared_data_dir() -> Path:
    """The project's data (../shared/data beside the checkout), or $EL_SHARED_DATA."""
    return Path(os.environ.get("EL_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set EL_SHARED_DATA")
    return path
