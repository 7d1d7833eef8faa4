import os
from pathlib import Path

import pytest
import torch

from mmdet_reference import FIXTURES, reference_root

# Same arithmetic as the reference runs (2 threads), and predictable CI load.
torch.set_num_threads(2)
# The command line's default precision is "auto" (timed on the machine): the suite runs fp32 so
# that its results do not depend on the CPU (tests/test_autoprecision.py tests auto itself).
os.environ["NASFPN_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The MMDetection parity fixtures (vendored in tests/fixtures/mmdet; a missing copy fails)."""
    root = reference_root()
    if root is None:
        pytest.fail(f"MMDetection parity fixtures missing: expected them in {FIXTURES}")
    return root


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
