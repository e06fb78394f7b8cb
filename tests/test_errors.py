"""Bad input for every public op and module: the exception type and a message that names the argument.

Each op has one valid call (VALID); every case replaces one argument and states the exception and a
regex the message must match.
"""
from __future__ import annotations

import pytest
import torch

import sapa
from sapa import functional as F


def _valid():
    """One valid set of arguments per op: B = 2, low-res 4x5, s = 2, K = 3, G = 2, P = 3."""
    r = torch.randn
    return {
        "window_similarity": dict(q=r(2, 3, 8, 10), k=r(2, 3, 4, 5), kernel_size=3, scale_factor=2),
        "reassemble": dict(weights=r(2, 18, 8, 10), v=r(2, 4, 4, 5), kernel_size=3, scale_factor=2, groups=2),
        "sapa": dict(q=r(2, 3, 8, 10), k=r(2, 3, 4, 5), v=r(2, 4, 4, 5), kernel_size=3, scale_factor=2),
        "deform_similarity": dict(q=r(2, 4, 8, 10), k=r(2, 4, 4, 5), offset=r(2, 12, 8, 10), num_points=3,
                                  groups=2, scale_factor=2),
        "deform_reassemble": dict(weights=r(2, 2, 3, 8, 10), v=r(2, 4, 4, 5), offset=r(2, 12, 8, 10),
                                  num_points=3, groups=2, scale_factor=2),
        "sapa_deform": dict(q=r(2, 4, 8, 10), k=r(2, 4, 4, 5), v=r(2, 4, 4, 5), offset=r(2, 12, 8, 10),
                            num_points=3, groups=2, scale_factor=2),
    }


OPS = list(_valid())
TENSOR_ARGS = {op: [n for n, a in args.items() if isinstance(a, torch.Tensor)] for op, args in _valid().items()}
WINDOW_OPS = ["window_similarity", "reassemble", "sapa"]
DEFORM_OPS = ["deform_similarity", "deform_reassemble", "sapa_deform"]


def _call(op, **changes):
    args = _valid()[op]
    args.update(changes)
    return getattr(F, op)(**args)


def test_valid_calls_run():
    """The baseline of every case below: the unchanged arguments are accepted."""
    shapes = {op: tuple(_call(op).shape) for op in OPS}
    assert shapes == {"window_similarity": (2, 9, 8, 10), "reassemble": (2, 4, 8, 10), "sapa": (2, 4, 8, 10),
                      "deform_similarity": (2, 2, 3, 8, 10), "deform_reassemble": (2, 4, 8, 10),
                      "sapa_deform": (2, 4, 8, 10)}


def _cases(fn):
    return [pytest.param(op, name, id=f"{op}-{name}") for op in OPS for name in TENSOR_ARGS[op] if fn(op, name)]


@pytest.mark.parametrize("op, name", _cases(lambda op, n: True))
def test_wrong_rank(op, name):
    t = _valid()[op][name]
    with pytest.raises(ValueError, match=rf"\b{name}\b.*must be a {t.dim()}-D tensor"):
        _call(op, **{name: t[0]})
    with pytest.raises(ValueError, match=rf"\b{name}\b.*must be a {t.dim()}-D tensor"):
        _call(op, **{name: t.unsqueeze(0)})


@pytest.mark.parametrize("op, name", _cases(lambda op, n: True))
def test_not_a_tensor(op, name):
    t = _valid()[op][name]
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        _call(op, **{name: t.tolist()})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("op, name", _cases(lambda op, n: True))
def test_non_floating_dtype(op, name, dtype):
    t = _valid()[op][name]
    with pytest.raises(TypeError, match=rf"\b{name}\b.*floating dtype"):
        _call(op, **{name: t.to(dtype)})


@pytest.mark.parametrize("op, name", _cases(lambda op, n: True))
def test_mismatched_batch(op, name):
    t = _valid()[op][name]
    with pytest.raises(ValueError, match=rf"batch sizes differ.*\b{name} \[1, "):
        _call(op, **{name: t[:1]})


@pytest.mark.parametrize("op, name", _cases(lambda op, n: True))
def test_different_devices(op, name):
    """'meta' vs cpu: two devices on a CPU-only machine."""
    t = _valid()[op][name]
    with pytest.raises(ValueError, match=rf"same device.*\b{name} on meta"):
        _call(op, **{name: t.to("meta")})


@pytest.mark.parametrize("op", ["window_similarity", "sapa", "deform_similarity", "sapa_deform"])
@pytest.mark.parametrize("which", ["q", "k"])
def test_qk_channel_mismatch(op, which):
    t = _valid()[op][which]
    bad = torch.randn(t.shape[0], t.shape[1] + 2, *t.shape[2:])
    with pytest.raises(ValueError, match=r"q and k must have the same number of channels"):
        _call(op, **{which: bad})


@pytest.mark.parametrize("value, exc", [(4, ValueError), (2, ValueError), (0, ValueError), (-3, ValueError),
                                        (3.0, TypeError), ("3", TypeError), (True, TypeError)],
                         ids=["4", "2", "0", "-3", "3.0", "str", "bool"])
@pytest.mark.parametrize("op", WINDOW_OPS)
def test_bad_kernel_size(op, value, exc):
    with pytest.raises(exc, match=r"kernel_size"):
        _call(op, kernel_size=value)


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (None, TypeError)],
                         ids=["0", "-2", "2.0", "None"])
@pytest.mark.parametrize("op", OPS)
def test_bad_scale_factor(op, value, exc):
    with pytest.raises(exc, match=r"scale_factor"):
        _call(op, scale_factor=value)


@pytest.mark.parametrize("param", ["groups", "num_points"])
@pytest.mark.parametrize("op", DEFORM_OPS)
def test_bad_groups_or_points(op, param):
    for value, exc in [(0, ValueError), (-1, ValueError), (1.5, TypeError)]:
        with pytest.raises(exc, match=param):
            _call(op, **{param: value})


def test_reassemble_bad_groups():
    for value, exc in [(0, ValueError), (2.0, TypeError)]:
        with pytest.raises(exc, match="groups"):
            _call("reassemble", groups=value)


def test_reassemble_channels_not_divisible():
    with pytest.raises(ValueError, match=r"v channels \(5\) must be divisible by groups \(2\)"):
        _call("reassemble", v=torch.randn(2, 5, 4, 5))


def test_reassemble_weight_channels():
    with pytest.raises(ValueError, match=r"weights has 17 channels.*expected 18"):
        _call("reassemble", weights=torch.randn(2, 17, 8, 10))
    # groups and kernel_size enter the expected count: groups=1 expects 9
    with pytest.raises(ValueError, match=r"weights has 18 channels.*expected 9"):
        _call("reassemble", groups=1)


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_deform_channels_not_divisible(op):
    if op == "deform_reassemble":
        with pytest.raises(ValueError, match=r"v channels \(5\) must be divisible by groups \(2\)"):
            _call(op, v=torch.randn(2, 5, 4, 5))
        return
    bad = dict(q=torch.randn(2, 5, 8, 10), k=torch.randn(2, 5, 4, 5))
    with pytest.raises(ValueError, match=r"q channels \(5\) must be divisible by groups \(2\)"):
        _call(op, **bad)
    if op == "sapa_deform":
        with pytest.raises(ValueError, match=r"v channels \(5\) must be divisible by groups \(2\)"):
            _call(op, v=torch.randn(2, 5, 4, 5))


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_offset_wrong_channels(op):
    with pytest.raises(ValueError, match=r"offset has 10 channels.*expected 12"):
        _call(op, offset=torch.randn(2, 10, 8, 10))
    # the expected count follows groups and num_points: 2 * 2 * 3 = 12, not 2 * 2 * 9
    with pytest.raises(ValueError, match=r"offset has 12 channels.*expected 36"):
        _call(op, num_points=9, **({"weights": torch.randn(2, 2, 9, 8, 10)} if op == "deform_reassemble" else {}))


def test_deform_reassemble_weight_shape():
    with pytest.raises(ValueError, match=r"weights .*must be \[B, groups=2, num_points=3"):
        _call("deform_reassemble", weights=torch.randn(2, 3, 2, 8, 10))
    with pytest.raises(ValueError, match=r"weights .*offset .*same spatial size"):
        _call("deform_reassemble", weights=torch.randn(2, 2, 3, 7, 10))


# high-res sizes against low-res 4x5 at s = 2: valid are H' in {7, 8}, W' in {9, 10}
BAD_HI = [(6, 10), (9, 10), (8, 8), (8, 11), (4, 5), (16, 20)]


@pytest.mark.parametrize("hi", BAD_HI, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("op", OPS)
def test_guide_size_beyond_ceil_mode(op, hi):
    args = _valid()[op]
    hi_names = [n for n in TENSOR_ARGS[op] if n in ("q", "weights", "offset")]
    changes = {n: torch.randn(*args[n].shape[:-2], *hi) for n in hi_names}
    # the message names the shapes and the valid range
    with pytest.raises(ValueError, match=r"does not match .*scale_factor=2.*\(8, 10\)"):
        _call(op, **changes)


@pytest.mark.parametrize("hi", [(7, 9), (7, 10), (8, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("op", OPS)
def test_ceil_mode_sizes_accepted(op, hi):
    """The counterpart: smaller by less than s is valid and gives the guide's size."""
    args = _valid()[op]
    changes = {n: torch.randn(*args[n].shape[:-2], *hi) for n in TENSOR_ARGS[op] if n in ("q", "weights", "offset")}
    assert tuple(_call(op, **changes).shape[-2:]) == hi


@pytest.mark.parametrize("op", ["sapa", "sapa_deform"])
def test_value_size_differs_from_key(op):
    with pytest.raises(ValueError, match=r"v \[2, 4, 3, 5\] and k \[2, \d, 4, 5\] must have the same spatial size"):
        _call(op, v=torch.randn(2, 4, 3, 5))


@pytest.mark.parametrize("op", ["deform_similarity", "sapa_deform"])
def test_offset_size_differs_from_query(op):
    with pytest.raises(ValueError, match=r"offset \[2, 12, 7, 10\] must have the spatial size of q"):
        _call(op, offset=torch.randn(2, 12, 7, 10))


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_unknown_backend(op):
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*valid backends.*'reference'"):
        _call(op, backend="nope")


@pytest.mark.parametrize("op", OPS)
def test_explicit_backend_that_cannot_run(op, monkeypatch):
    """backend='triton' on CPU tensors without TRITON_INTERPRET: RuntimeError with the reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"triton.*(CUDA|TRITON_INTERPRET)"):
        _call(op, backend="triton")


def test_explicit_cpu_backend_on_meta_tensors():
    args = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _valid()["sapa"].items()}
    with pytest.raises(RuntimeError, match=r"cpu.*meta"):
        F.sapa(**args, backend="cpu")


# ---------------------------------------------------------------------------------------------
# registry and modules
# ---------------------------------------------------------------------------------------------

def test_build_unknown_name_lists_valid():
    with pytest.raises(KeyError, match=r"unknown upsampler 'sapa_x'.*sapa_b") as info:
        sapa.build_upsampler("sapa_x", 64)
    for name in sapa.list_upsamplers():
        assert name in str(info.value)


def test_build_bad_specs():
    with pytest.raises(KeyError, match=r"'type'"):
        sapa.build_upsampler({"kernel_size": 3}, 64)
    with pytest.raises(KeyError, match=r"unknown upsampler 'nope'"):
        sapa.build_upsampler({"type": "nope"}, 64)
    with pytest.raises(TypeError, match=r"spec must be"):
        sapa.build_upsampler(42, 64)
    with pytest.raises(TypeError, match=r"spec must be"):
        sapa.build_upsampler(torch.nn.Conv2d, 64)
    inst = sapa.build_upsampler("sapa_i", 64)
    with pytest.raises(ValueError, match=r"in_channels=64.*in_channels=32"):
        sapa.build_upsampler(inst, 32)
    with pytest.raises(ValueError, match=r"scale_factor"):
        sapa.build_upsampler(inst, 64, scale_factor=4)


def test_register_bad():
    with pytest.raises(ValueError, match="name"):
        sapa.register_upsampler("")
    with pytest.raises(TypeError, match="not a subclass"):
        sapa.register_upsampler("not_an_upsampler")(torch.nn.Conv2d)
    with pytest.raises(KeyError, match="already registered"):
        sapa.register_upsampler("sapa_b")(type("Other", (sapa.registry.Upsampler,), {}))


ALL = sapa.list_upsamplers()
GUIDED = [n for n in ALL if sapa.registry.get_upsampler_class(n).needs_guide]


@pytest.mark.parametrize("name", ALL)
def test_constructor_bad_common_args(name):
    for kw, exc, match in [(dict(scale_factor=0), ValueError, "scale_factor"),
                           (dict(scale_factor=1.5), TypeError, "scale_factor")]:
        with pytest.raises(exc, match=match):
            sapa.build_upsampler(name, 64, **kw)
    with pytest.raises(ValueError, match="in_channels"):
        sapa.build_upsampler(name, 0)


@pytest.mark.parametrize("name", GUIDED)
def test_guided_module_without_guide(name):
    up = sapa.build_upsampler(name, 64)
    with pytest.raises(ValueError, match=r"guide"):
        up(torch.randn(1, 64, 4, 5))


@pytest.mark.parametrize("name", ALL)
def test_module_bad_x(name):
    up = sapa.build_upsampler(name, 64)
    g = torch.randn(2, 64, 8, 10)
    with pytest.raises(ValueError, match=r"\bx\b.*4-D"):
        up(torch.randn(64, 4, 5), g)
    with pytest.raises(ValueError, match=r"\bx\b.*48 channels.*expected 64"):
        up(torch.randn(2, 48, 4, 5), g)
    with pytest.raises(TypeError, match=r"\bx\b.*floating"):
        up(torch.randint(0, 5, (2, 64, 4, 5)), g)


@pytest.mark.parametrize("name", ALL)
def test_module_bad_guide(name):
    up = sapa.build_upsampler(name, 64)
    x = torch.randn(2, 64, 4, 5)
    with pytest.raises(ValueError, match=r"batch sizes differ.*guide \[1, "):
        up(x, torch.randn(1, 64, 8, 10))
    with pytest.raises(ValueError, match=r"guide \[2, 64, 6, 10\] does not match x"):
        up(x, torch.randn(2, 64, 6, 10))
    with pytest.raises(ValueError, match=r"\bguide\b.*4-D"):
        up(x, torch.randn(64, 8, 10))
    with pytest.raises(ValueError, match=r"same device.*guide on meta"):
        up(x, torch.randn(2, 64, 8, 10, device="meta"))


@pytest.mark.parametrize("name", GUIDED)
def test_module_guide_channels(name):
    up = sapa.build_upsampler(name, 64)
    with pytest.raises(ValueError, match=r"guide has 48 channels.*expected 64"):
        up(torch.randn(2, 64, 4, 5), torch.randn(2, 48, 8, 10))


def test_sapa_module_constructor_errors():
    cases = [
        (("sapa_i", 64), dict(kernel_size=4), ValueError, "kernel_size"),
        (("sapa_b", 64), dict(kernel_size=0), ValueError, "kernel_size"),
        (("sapa_g", 64), dict(kernel_size=6), ValueError, "kernel_size"),
        (("sapa_i", 64), dict(guide_channels=32), ValueError, "guide_channels"),
        (("sapa_b", 48), dict(), ValueError, r"GroupNorm.*48"),
        (("sapa_b", 64), dict(version="v3"), ValueError, "version"),
        (("sapa_b", 64), dict(embedding_dim=0), ValueError, "embedding_dim"),
        (("sapa_i", 64), dict(norm="batch"), ValueError, "norm"),
        (("sapa_d", 66), dict(norm=False), ValueError, r"in_channels \(66\) must be divisible by groups \(4\)"),
        (("sapa_d", 64), dict(num_points=0), ValueError, "num_points"),
        (("sapa_d", 64), dict(groups=0), ValueError, "groups"),
    ]
    for (name, c), kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            sapa.build_upsampler(name, c, **kw)
    # and the valid neighbours of those cases build
    sapa.build_upsampler("sapa_b", 48, norm="layer")
    sapa.build_upsampler("sapa_b", 48, version="neurips")
