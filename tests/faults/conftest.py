"""Fixtures of the fault-injection suite (helpers live in _helpers.py)."""
from __future__ import annotations

import pytest

from ._helpers import TINY, quiet as _quiet, tiny_config_factory


@pytest.fixture
def tiny_config():
    return tiny_config_factory()


@pytest.fixture
def quiet():
    return _quiet


@pytest.fixture
def tiny_overrides():
    return list(TINY)
