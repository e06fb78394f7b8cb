"""Backend selection (sapa.backends): explicit argument > use_backend() > SAPA_BACKEND > automatic.

Written to hold whether or not a fast CPU backend is registered: automatic choice on CPU tensors is
"cpu" or "reference", never "triton"; where a test needs a backend to decline or to accept, it says so
through monkeypatch instead of relying on what is installed.
"""
from __future__ import annotations

import logging

import pytest
import torch

import sapa
from sapa import backends
from sapa import functional as F

OPS = list(backends.OP_FOLDERS)


def _tensors(op, device="cpu", dtype=torch.float32):
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return {
        "window_similarity": (r(1, 2, 4, 6), r(1, 2, 2, 3)),
        "reassemble": (r(1, 9, 4, 6), r(1, 2, 2, 3)),
        "sapa": (r(1, 2, 4, 6), r(1, 2, 2, 3), r(1, 2, 2, 3)),
        "deform_similarity": (r(1, 2, 4, 6), r(1, 2, 2, 3), r(1, 4, 4, 6)),
        "deform_reassemble": (r(1, 1, 2, 4, 6), r(1, 2, 2, 3), r(1, 4, 4, 6)),
        "sapa_deform": (r(1, 2, 4, 6), r(1, 2, 2, 3), r(1, 2, 2, 3), r(1, 4, 4, 6)),
    }[op]


def _call(op, *tensors, **kw):
    args = dict(window_similarity=(3, 2), reassemble=(3, 2), sapa=(3, 2),
                deform_similarity=(2, 1, 2), deform_reassemble=(2, 1, 2), sapa_deform=(2, 1, 2))[op]
    return getattr(F, op)(*tensors, *args, **kw)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SAPA_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_list_backends():
    assert set(sapa.list_backends()) == {"reference", "cpu", "triton"}
    assert set(backends.PRIORITY) == set(sapa.list_backends())
    assert backends.PRIORITY[-1] == "reference"  # the fallback comes last


@pytest.mark.parametrize("op", OPS)
def test_automatic_choice_on_cpu(op):
    """CPU tensors: a fast CPU backend if one can run, else the reference; triton is opt-in only."""
    chosen = sapa.choose_backend(op, *_tensors(op))
    assert chosen in ("cpu", "reference")
    expected = "cpu" if backends.can_run_cpu(op, *_tensors(op)) else "reference"
    assert chosen == expected


@pytest.mark.parametrize("op", OPS)
def test_triton_interpret_is_not_chosen_automatically(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sapa.choose_backend(op, *_tensors(op)) in ("cpu", "reference")


@pytest.mark.parametrize("op", OPS)
def test_use_backend_forces_reference(op):
    with sapa.use_backend("reference"):
        assert sapa.choose_backend(op, *_tensors(op)) == "reference"
        assert sapa.choose_backend(op, *_tensors(op, device="meta")) == "reference"


@pytest.mark.parametrize("op", OPS)
def test_env_var_forces(op, monkeypatch):
    monkeypatch.setenv("SAPA_BACKEND", "reference")
    assert sapa.choose_backend(op, *_tensors(op)) == "reference"
    monkeypatch.setenv("SAPA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"triton.*(CUDA|TRITON_INTERPRET)"):
        sapa.choose_backend(op, *_tensors(op))


def test_empty_env_var_means_automatic(monkeypatch):
    monkeypatch.setenv("SAPA_BACKEND", "")
    assert sapa.choose_backend("sapa", *_tensors("sapa")) in ("cpu", "reference")


def test_precedence(monkeypatch):
    """explicit argument > use_backend() > SAPA_BACKEND; each level shown by forcing 'triton', which
    cannot run on CPU tensors, below the level that says 'reference'."""
    ts = _tensors("sapa")
    monkeypatch.setenv("SAPA_BACKEND", "triton")
    with pytest.raises(RuntimeError):
        sapa.choose_backend("sapa", *ts)
    with sapa.use_backend("reference"):
        assert sapa.choose_backend("sapa", *ts) == "reference"  # use_backend beats the env var
    with sapa.use_backend("triton"):
        with pytest.raises(RuntimeError):
            sapa.choose_backend("sapa", *ts)
        assert sapa.choose_backend("sapa", *ts, backend="reference") == "reference"  # argument beats both
        out = F.sapa(*ts, 3, 2, backend="reference")  # and the functional op runs
        assert out.shape == (1, 2, 4, 6)


def test_use_backend_nests_and_restores():
    ts = _tensors("sapa")
    with sapa.use_backend("triton"):
        with sapa.use_backend(None):  # None restores automatic choice
            assert sapa.choose_backend("sapa", *ts) in ("cpu", "reference")
        with pytest.raises(RuntimeError):  # back to the outer 'triton'
            sapa.choose_backend("sapa", *ts)
    assert sapa.choose_backend("sapa", *ts) in ("cpu", "reference")
    # restored also when the block raises
    with pytest.raises(ZeroDivisionError):
        with sapa.use_backend("triton"):
            1 / 0
    assert sapa.choose_backend("sapa", *ts) in ("cpu", "reference")


def test_invalid_names(monkeypatch):
    ts = _tensors("sapa")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*\['cpu', 'reference', 'triton'\]"):
        with sapa.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match=r"unknown backend 'numba'.*\['cpu', 'reference', 'triton'\]"):
        sapa.choose_backend("sapa", *ts, backend="numba")
    monkeypatch.setenv("SAPA_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*\['cpu', 'reference', 'triton'\]"):
        sapa.choose_backend("sapa", *ts)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        F.sapa(*ts, 3, 2)


@pytest.mark.parametrize("op", OPS)
def test_explicit_backend_that_cannot_run_raises_reason(op):
    with pytest.raises(RuntimeError, match=r"triton: tensors are not on a CUDA device.*TRITON_INTERPRET"):
        _call(op, *_tensors(op), backend="triton")
    with pytest.raises(RuntimeError, match=r"cpu: tensors are on meta"):
        _call(op, *_tensors(op, device="meta"), backend="cpu")


def test_can_run_functions():
    ts = _tensors("sapa")
    assert backends.can_run_reference("sapa", *ts) is True
    assert backends.can_run_triton("sapa", *ts) is False
    with pytest.raises(RuntimeError, match="CUDA"):
        backends.can_run_triton("sapa", *ts, raise_error=True)
    assert backends.can_run_cpu("sapa", *_tensors("sapa", device="meta")) is False
    with pytest.raises(RuntimeError, match="meta"):
        backends.can_run_cpu("sapa", *_tensors("sapa", device="meta"), raise_error=True)


def test_triton_interpret_lifts_the_device_reason(monkeypatch):
    """With TRITON_INTERPRET=1 an explicit triton request on CPU tensors is no longer refused for
    the device (it runs, or declines for another stated reason)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        assert backends.can_run_triton("window_similarity", *_tensors("window_similarity"), raise_error=True)
    except RuntimeError as why:
        assert "CUDA" not in str(why) and str(why).startswith("triton:")


def test_decline_is_logged_with_reason(monkeypatch, caplog):
    """A backend that declines during automatic choice is logged at DEBUG on the 'sapa' logger."""
    monkeypatch.setattr(backends, "numba_available", lambda: False)
    with caplog.at_level(logging.DEBUG, logger="sapa"):
        assert sapa.choose_backend("sapa", *_tensors("sapa")) == "reference"
    records = [r for r in caplog.records if r.name == "sapa" and r.levelno == logging.DEBUG]
    assert any("cpu" in r.getMessage() and "numba" in r.getMessage() and "sapa" in r.getMessage()
               for r in records), [r.getMessage() for r in caplog.records]


def test_decline_for_device_is_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="sapa"):
        assert sapa.choose_backend("sapa_deform", *_tensors("sapa_deform", device="meta")) == "reference"
    messages = [r.getMessage() for r in caplog.records if r.name == "sapa" and r.levelno == logging.DEBUG]
    assert any("cpu" in m and "meta" in m for m in messages), messages


def test_no_log_when_forced(monkeypatch, caplog):
    """A forced backend is not a choice: nothing declines, nothing is logged."""
    monkeypatch.setattr(backends, "numba_available", lambda: False)
    with caplog.at_level(logging.DEBUG, logger="sapa"):
        assert sapa.choose_backend("sapa", *_tensors("sapa"), backend="reference") == "reference"
    assert not [r for r in caplog.records if r.name == "sapa" and "declined" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# dispatch: the functional op calls the implementation of the chosen backend
# ---------------------------------------------------------------------------------------------

class _Spy:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        return "spy-result"


@pytest.mark.parametrize("op", OPS)
def test_dispatch_calls_chosen_implementation(op, monkeypatch):
    _call(op, *_tensors(op), backend="reference")  # make sure the real implementations are loaded
    spy = _Spy()
    monkeypatch.setitem(backends._IMPLS, (op, "reference"), spy)
    assert _call(op, *_tensors(op), backend="reference") == "spy-result"
    with sapa.use_backend("reference"):
        assert _call(op, *_tensors(op)) == "spy-result"
    monkeypatch.setenv("SAPA_BACKEND", "reference")
    assert _call(op, *_tensors(op)) == "spy-result"
    assert len(spy.calls) == 3
    # the implementation gets the op's arguments after validation: tensors, then the integers
    args = spy.calls[0]
    n_tensors = len(_tensors(op))
    assert all(isinstance(a, torch.Tensor) for a in args[:n_tensors])
    assert all(isinstance(a, int) for a in args[n_tensors:])


def test_dispatch_promotes_dtypes_before_the_backend(monkeypatch):
    """Mixed float dtypes are promoted before any backend sees them."""
    F.sapa(*_tensors("sapa"), 3, 2, backend="reference")
    spy = _Spy()
    monkeypatch.setitem(backends._IMPLS, ("sapa", "reference"), spy)
    q, k, v = _tensors("sapa")
    F.sapa(q, k.double(), v.half(), 3, 2, backend="reference")
    assert [t.dtype for t in spy.calls[0][:3]] == [torch.float64] * 3


def test_fast_cpu_backend_preferred_when_it_can_run(monkeypatch):
    """Priority: a CPU backend that accepts is chosen over the reference (simulated with a spy, so
    this holds before and after the real CPU kernels exist)."""
    F.sapa(*_tensors("sapa"), 3, 2, backend="reference")
    spy = _Spy()
    monkeypatch.setattr(backends, "numba_available", lambda: True)
    monkeypatch.setitem(backends._IMPLS, ("sapa", "cpu"), spy)
    assert sapa.choose_backend("sapa", *_tensors("sapa")) == "cpu"
    assert F.sapa(*_tensors("sapa"), 3, 2) == "spy-result"
    with sapa.use_backend("reference"):
        assert isinstance(F.sapa(*_tensors("sapa"), 3, 2), torch.Tensor)
    assert len(spy.calls) == 1
