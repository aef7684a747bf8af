import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# One thread: on a shared 2-core machine a second OpenMP thread waits on every barrier.
torch.set_num_threads(1)

from synthetic import synthetic_arrays, write_synthetic_npz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def synthetic_npz(tmp_path: Path) -> Path:
    """A valid 120-frame synthetic ethanol file in sGDML layout."""
    return write_synthetic_npz(tmp_path / "md17_ethanol.npz")


@pytest.fixture
def ethanol_arrays() -> dict:
    return synthetic_arrays("ethanol", 120, 0)
