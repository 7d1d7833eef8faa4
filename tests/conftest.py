import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NASFPN_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"

# Same arithmetic as the reference runs (2 threads), and predictable CI load.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "README.md").is_file():
        pytest.skip(f"MMDetection reference fixtures not found at {REFERENCE} (set NASFPN_SHARED)")
    return REFERENCE


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
