"""Shared test set-up: markers, seeding, the slow-test switch."""
from __future__ import annotations

import os

# The triton backend's kernels are checked on CPU through triton's interpreter. Triton reads the flag
# when it (and each kernel) is first imported, so it must be set before anything imports triton,
# i.e. here. It changes no automatic choice: the triton backend runs CPU tensors only when asked.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sapa import flags  # noqa: E402


def pytest_collection_modifyitems(config, items):
    run_slow = flags.slow_tests() or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow sweep: set SAPA_SLOW=1 (make test-slow) to run")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Tests use few threads: CI has 2 cores and runs 2 xdist workers.
    torch.set_num_threads(int(os.environ.get("SAPA_TEST_THREADS", "1")))
