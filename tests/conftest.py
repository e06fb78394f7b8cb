"""Shared test set-up: markers, seeding, the slow-test switch."""
from __future__ import annotations

import os

import pytest
import torch

from sapa import flags


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
