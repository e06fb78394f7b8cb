"""API edges: build_upsampler with an instance and kwargs, torch.jit.trace of every guided
upsampler, float8 and other dtypes no backend computes in, a bad SAPA_LOG_LEVEL, list_upsamplers
with a non-pattern."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import sapa
from sapa import flags
from sapa import functional as F

from ._helpers import C, GUIDED, UPSAMPLERS, make_upsampler, seeded


def test_build_upsampler_instance_with_kwargs_is_refused():
    up = sapa.build_upsampler("carafe", 32)
    with pytest.raises(TypeError, match=r"already built CARAFE instance and constructor keyword\(s\) kernel_size"):
        sapa.build_upsampler(up, 32, kernel_size=7)
    assert sapa.build_upsampler(up, 32) is up  # alone it is still accepted


@pytest.mark.parametrize("name", GUIDED)
def test_jit_trace_of_every_guided_upsampler(name):
    up = make_upsampler(name).eval()
    x, g = seeded(2, C, 4, 5), seeded(2, C, 8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values are expected
        traced = torch.jit.trace(up, (x, g), check_trace=False)
    torch.testing.assert_close(traced(x, g), up(x, g))


FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_is_refused_naming_the_valid_dtypes(dtype):
    x = seeded(1, 3, 4, 5).to(dtype)
    msg = r"\bq\b must have a floating dtype \(float16, bfloat16, float32 or float64\), got torch.float8"
    with pytest.raises(TypeError, match=msg):
        F.window_similarity(x, seeded(1, 3, 2, 3), kernel_size=3)
    up = make_upsampler(UPSAMPLERS[0])
    with pytest.raises(TypeError, match=r"\bx\b must have a floating dtype"):
        up(seeded(1, C, 4, 5).to(dtype))


def test_bad_log_level_warns_once_and_keeps_the_default(monkeypatch):
    logger = logging.getLogger("sapa")
    before = logger.level
    monkeypatch.setenv("SAPA_LOG_LEVEL", "bogus")
    with pytest.warns(RuntimeWarning, match=r"SAPA_LOG_LEVEL='bogus' is not a log level; valid: DEBUG, INFO, "
                                            r"WARNING, ERROR, CRITICAL") as rec:
        flags.configure_logging()
    assert len(rec) == 1 and logger.level == before
    monkeypatch.setenv("SAPA_LOG_LEVEL", "debug")
    try:
        assert flags.configure_logging().level == logging.DEBUG
    finally:
        logger.setLevel(before)


@pytest.mark.parametrize("pattern", [5, None, ["sapa*"]])
def test_list_upsamplers_needs_a_pattern_string(pattern):
    with pytest.raises(TypeError, match=r"list_upsamplers: pattern must be an fnmatch pattern str"):
        sapa.list_upsamplers(pattern)
