"""First use and packaging: what ``import sapa`` loads, where compiled kernels go, what the wheel holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _run(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(SRC) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def _json_out(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# import cost


def test_import_sapa_does_not_import_dynamo_or_kernels():
    """``import sapa`` (and touching its public names) loads neither torch._dynamo (0.7 s of a
    2 s import before) nor numba / triton (loaded when a kernel first runs)."""
    proc = _run(
        "import sys, json, sapa, sapa.nn, sapa.functional\n"
        "sapa.build_upsampler('sapa_b', in_channels=32); sapa.list_backends()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'triton')\n"
        "      or m.startswith('torch._dynamo'))))")
    assert _json_out(proc) == []


def test_cli_help_does_not_import_dynamo():
    proc = _run("import sys, json\nimport sapa.cli\n"
                "try:\n    sapa.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('torch._dynamo')\n"
                "      or m.split('.')[0] in ('numba', 'triton', 'torchvision', 'timm', 'transformers'))))")
    assert _json_out(proc) == []


def test_bare_import_sapa_does_not_import_torch():
    proc = _run("import sys, json, sapa\nprint(json.dumps([sapa.__version__, 'torch' in sys.modules]))")
    assert _json_out(proc) == ["0.1.0", False]


def test_lazy_public_names_are_the_real_objects():
    import sapa
    from sapa import backends, registry

    assert sapa.build_upsampler is registry.build_upsampler
    assert sapa.use_backend is backends.use_backend
    assert sapa.functional.__name__ == "sapa.functional"
    assert set(sapa.__all__) <= set(dir(sapa))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sapa.nope  # noqa: B018


def test_assume_constant_result_mechanism_unchanged():
    """sapa.backends marks its dispatch function for torch.compile without importing dynamo, by
    setting the attribute the public decorator sets. If a torch release changes the mechanism,
    this fails (and torch.compile(fullgraph=True) over sapa ops would break)."""
    import torch

    import sapa.backends as B

    def f():
        return 1

    torch.compiler.assume_constant_result(f)
    assert vars(f) == {"_dynamo_marked_constant": True}
    assert B._choose_while_compiling._dynamo_marked_constant is True
