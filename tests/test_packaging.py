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



def test_cli_help_imports_no_torch_and_a_command_keeps_its_options():
    """``sapa --help`` lists every command from its HELP line: no command's register() (which imports
    torch for its choices) runs; the command that is named still registers all its options."""
    proc = _run("import sys, json, contextlib, io\nimport sapa.cli\nout = io.StringIO()\n"
                "with contextlib.redirect_stdout(out):\n    try:\n        sapa.cli.main(['--help'])\n"
                "    except SystemExit:\n        pass\n"
                "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
                "sub = io.StringIO()\n"
                "with contextlib.redirect_stdout(sub):\n    try:\n        sapa.cli.main(['bench', '--help'])\n"
                "    except SystemExit:\n        pass\n"
                "print(json.dumps([heavy, 'warmup' in out.getvalue(), '--shapes' in sub.getvalue()]))")
    assert _json_out(proc) == [[], True, True]

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
    proc = _run("import json, sapa\nprint(json.dumps([sapa.backends.__name__, sapa.registry.__name__, "
                "type(sapa.nn.SAPAB).__name__]))")
    assert _json_out(proc) == ["sapa.backends", "sapa.registry", "type"]  # submodules resolve lazily


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


# ---------------------------------------------------------------------------------------------
# compiled-kernel cache (numba)

_IGNORE = ("__pycache__",)
# one small CPU op (compiles a single kernel) checked against the reference backend in the child
_FIRST_CALL = (
    "import json, torch, sapa.functional as F\n"
    "torch.manual_seed(0)\n"
    "q, k = torch.randn(1, 8, 6, 6), torch.randn(1, 8, 3, 3)\n"
    "a = F.window_similarity(q, k, 3, 2, backend='cpu')\n"
    "b = F.window_similarity(q, k, 3, 2, backend='reference')\n"
    "from sapa.ops._common import kernel_cache_dir\n"
    "print(json.dumps([float((a - b).abs().max()), kernel_cache_dir()]))\n")


def _install_copy(dest: Path, read_only: bool) -> Path:
    """A copy of the package as an installer would lay it out (site/sapa/...), without caches."""
    import shutil

    site = dest / "site"
    shutil.copytree(SRC / "sapa", site / "sapa", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    if read_only:
        for d, _, files in os.walk(site):
            for f in files:
                os.chmod(os.path.join(d, f), 0o444)
        for d, _, _ in os.walk(site, topdown=False):
            os.chmod(d, 0o555)
    return site


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _child_env(site: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAPA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "PYTHONPATH")}
    # Python's own .pyc writing is not what is tested here (installers precompile); numba's is
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", SAPA_BACKEND="", **extra)
    return env


def _run_child(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                          cwd=env.get("HOME") if os.path.isdir(env.get("HOME", "")) else None)


def test_first_call_read_only_install_and_unwritable_home(tmp_path):
    """Read-only install folder and a HOME that cannot hold ~/.cache: the first call works (the
    kernels compile without a cache, one warning says so) and nothing is written under the package.
    (Run as root, the mode bits do not stop writes; the snapshot comparison still catches any.)"""
    site = _install_copy(tmp_path, read_only=True)
    (tmp_path / "home_is_a_file").write_text("")
    home = tmp_path / "home_is_a_file" / "home"  # under a regular file: no user can create it
    before = _snapshot(site)
    try:
        proc = _run_child(_FIRST_CALL, _child_env(site, HOME=str(home)))
        err, diff_and_dir = proc.stderr, (_json_out(proc) if proc.returncode == 0 else None)
        assert proc.returncode == 0, err[-3000:]
        assert diff_and_dir[0] < 1e-5
        assert diff_and_dir[1] is None  # caching is off
        assert err.count("without a cache") == 1, err
        assert "cannot cache" not in err and "Traceback" not in err
        assert _snapshot(site) == before
    finally:
        for d, _, _ in os.walk(site):
            os.chmod(d, 0o755)


def test_cache_folder_honoured_and_compile_logged_once(tmp_path):
    """SAPA_CACHE_DIR receives the cache; the first process logs one 'compiling' line naming it,
    a second process loads from it silently; nothing lands in the package folder."""
    site = _install_copy(tmp_path, read_only=False)
    cache = tmp_path / "kernel cache"
    env = _child_env(site, HOME=str(tmp_path / "nohome"), SAPA_CACHE_DIR=str(cache))
    before = _snapshot(site)
    first = _run_child(_FIRST_CALL, env)
    diff, where = _json_out(first)
    assert diff < 1e-5
    assert where == str(cache / "numba")
    assert first.stderr.count("compiling the numba CPU kernels") == 1, first.stderr
    assert str(cache / "numba") in first.stderr
    cached = sorted(p.name for p in cache.rglob("*.nbi"))
    assert any(n.startswith("cpu.similarity_fwd-") for n in cached), cached
    second = _run_child(_FIRST_CALL, env)
    assert _json_out(second)[0] < 1e-5
    assert "compiling" not in second.stderr, second.stderr
    assert _snapshot(site) == before
    assert not (tmp_path / "nohome").exists()


def test_cache_dir_flag(monkeypatch, tmp_path):
    from sapa import flags

    monkeypatch.delenv("SAPA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert flags.cache_dir() == str(tmp_path / "h" / ".cache" / "sapa")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert flags.cache_dir() == str(tmp_path / "xdg" / "sapa")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG spec says
    assert flags.cache_dir() == str(tmp_path / "h" / ".cache" / "sapa")
    monkeypatch.setenv("SAPA_CACHE_DIR", str(tmp_path / "mine"))
    assert flags.cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("SAPA_CACHE_DIR", "relative")
    with pytest.raises(ValueError, match="SAPA_CACHE_DIR must be an absolute path, got 'relative'"):
        flags.cache_dir()


# ---------------------------------------------------------------------------------------------
# public API surface


def test_sapa_nn_exports_every_builtin_upsampler():
    import sapa.nn
    from sapa.registry import get_upsampler_class, list_upsamplers

    builtin = {get_upsampler_class(n) for n in list_upsamplers()
               if get_upsampler_class(n).__module__.startswith("sapa.nn.")}
    exported = {getattr(sapa.nn, n) for n in sapa.nn.__all__}
    assert builtin <= exported, sorted(c.__name__ for c in builtin - exported)
    assert len(builtin) >= 13  # nearest, bilinear, deconv, pixelshuffle, carafe, indexnet, a2u, fade, sapa_*, dysample
    from sapa.nn import CARAFE, FADE, A2U, IndexNet, DySample  # noqa: F401  (the issue's failing import)


def _public_functions():
    """Every public function / method of the public modules, with its signature."""
    import importlib
    import inspect

    mods = ["sapa.functional", "sapa.nn", "sapa.metrics", "sapa.data", "sapa.registry", "sapa.backends"]
    seen = set()
    for m in mods:
        mod = importlib.import_module(m)
        names = getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")])
        for n in names:
            obj = getattr(mod, n)
            if not getattr(obj, "__module__", "").startswith("sapa") or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                for a, f in vars(obj).items():
                    if inspect.isfunction(f) and (not a.startswith("_") or a in ("__init__", "__call__")):
                        yield f"{obj.__module__}.{obj.__qualname__}.{a}", f
            elif inspect.isfunction(obj):
                yield f"{obj.__module__}.{n}", obj


def test_public_api_is_annotated():
    """py.typed promises annotations: every parameter and return of the public API has one."""
    import inspect

    missing = []
    for name, f in _public_functions():
        sig = inspect.signature(f)
        for p in list(sig.parameters.values()):
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({p.name})")
        if f.__name__ != "__init__" and sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert not missing, missing
    assert (SRC / "sapa" / "py.typed").is_file()


# ---------------------------------------------------------------------------------------------
# sapa warmup

_KERNELS = {f"window.{n}" for n in ("similarity_fwd", "similarity_bwd", "reassemble_fwd", "reassemble_bwd",
                                    "sapa_fwd", "sapa_bwd")} | \
           {f"deform.{n}" for n in ("to_cl", "similarity_fwd", "similarity_bwd", "reassemble_fwd",
                                    "reassemble_bwd", "sapa_fwd", "sapa_bwd", "band_rows", "band_reduce")}


def test_warmup_builds_every_cpu_kernel():
    """`sapa warmup` leaves every top-level CPU kernel with a float32 build (written out here: a
    kernel added to cpu.py without a path in warmup fails this or warmup's own check)."""
    from sapa.cli.cmd_warmup import kernels, warmup

    lines = []
    sigs = warmup(["float32"], report=lines.append)
    assert set(kernels()) == _KERNELS
    assert set(sigs) == _KERNELS
    assert all(any("float32" in s for s in ss) for ss in sigs.values()), sigs
    assert lines[0].startswith("kernel cache: ") and len(lines) == 1 + 6
    assert all(f"[{i}/6]" in lines[i] for i in range(1, 7))
    with pytest.raises(ValueError, match=r"dtypes must be among \['float32', 'float64'\], got \['float16'\]"):
        warmup(["float16"])


def test_list_run_reports_progress_on_stderr(capsys):
    from sapa.cli import main

    assert main(["list", "sapa_[ib]", "--run", "--json", "--channels", "32", "--size", "4", "--batch", "1",
                 "--repeats", "1"]) == 0
    cap = capsys.readouterr()
    assert [json.loads(line)["upsampler"] for line in cap.out.splitlines()] == ["sapa_i", "sapa_b"]
    assert "sapa list: [1/2] sapa_i ..." in cap.err and "sapa list: [2/2] sapa_b ..." in cap.err
    assert main(["list", "sapa_[ib]", "--json"]) == 0  # without --run: no progress lines
    assert "sapa list:" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# optional dependencies

def test_tested_versions_match_constraints():
    from sapa._optional import EXTRA, TESTED

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {p: pins[p] for p in TESTED} == TESTED
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for pkg, extra in EXTRA.items():
        assert any(req.startswith(pkg) for req in extras[extra]), (pkg, extra)


_BLOCK = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == {pkg!r}:\n"
    "            {action}\n"
    "sys.meta_path.insert(0, Block())\n")


def _with_blocked(pkg: str, action: str, code: str) -> subprocess.CompletedProcess:
    return _run(_BLOCK.format(pkg=pkg, action=action) + code)


@pytest.mark.parametrize("pkg,call,extra", [
    ("timm", "sapa.models.upernet_r50()", "models"),
    ("transformers", "sapa.models.segformer_b1()", "models"),
    ("torchvision", "sapa.models.faster_rcnn_r50()", "models"),
    ("pycocotools", "sapa.metrics.COCOBoxEvaluator().compute()", "train"),
])
def test_missing_optional_dependency_is_one_clear_error(pkg, call, extra):
    from sapa._optional import TESTED

    proc = _with_blocked(pkg, "raise ModuleNotFoundError(f'No module named {name!r}', name=name)",
                         f"import sapa.models, sapa.metrics\n"
                         f"from sapa._optional import OptionalDependencyError\n"
                         f"try:\n    {call}\nexcept OptionalDependencyError as e:\n    print('ERR', e)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = proc.stdout.split("ERR ", 1)[1].strip()
    assert f"needs {pkg}" in msg and f"pip install 'sapa[{extra}]'" in msg, msg
    assert f"{pkg}=={TESTED[pkg]}" in msg and "constraints.txt" in msg, msg


def test_torchvision_built_for_another_torch_names_the_pair():
    """The failure of the issue: importing torchvision raises 'operator torchvision::nms does not
    exist'. Simulated by a finder raising it; every host that needs torchvision (timm does too)
    says which pair to install, in one line from the CLI-facing error type."""
    from sapa._optional import TESTED

    proc = _with_blocked("torchvision", "raise RuntimeError('operator torchvision::nms does not exist')",
                         "import sapa.models\n"
                         "from sapa._optional import OptionalDependencyError\n"
                         "for f in (sapa.models.faster_rcnn_r50, sapa.models.upernet_r50):\n"
                         "    try:\n        f()\n    except OptionalDependencyError as e:\n        print('ERR', e)\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    msgs = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ERR ")]
    assert len(msgs) == 2, proc.stdout + proc.stderr[-2000:]
    for msg in msgs:
        assert "built for another torch" in msg, msg
        assert f"torch=={TESTED['torch']} with torchvision=={TESTED['torchvision']}" in msg, msg
    assert "Traceback" not in proc.stderr


def test_cli_reports_optional_dependency_error_in_one_line(monkeypatch, capsys):
    import sapa.registry
    from sapa._optional import OptionalDependencyError, missing_message
    from sapa.cli import EXIT_CODES, main

    def boom(*a, **k):
        raise OptionalDependencyError(missing_message("timm", "the ResNet encoder (UPerNet)"))

    monkeypatch.setattr(sapa.registry, "list_upsamplers", boom)
    assert main(["list"]) == EXIT_CODES["missing optional dependency"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sapa list: error: the ResNet encoder (UPerNet) needs timm"), err


# ---------------------------------------------------------------------------------------------
# metadata and the wheel

def test_readme_tested_versions_match_constraints():
    import re

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    text = (ROOT / "README.md").read_text()
    sentence = text[text.index("Tested with Python"):].split(";")[0]
    stated = dict(re.findall(r"\b([a-z][a-z0-9_-]*) (\d+\.\d+(?:\.\d+)?)", sentence.replace("\n", " ")))
    stated.pop("python", None)
    assert len(stated) >= 8, stated
    assert {k: pins.get(k) for k in stated} == stated


def test_license_and_citation_files():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text, not a stub
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in meta["classifiers"]
    import yaml  # PyYAML comes with mkdocs (docs extra)

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0" and cff["version"] == meta["version"]
    ids = {cff["preferred-citation"]["identifiers"][0]["value"], cff["references"][0]["identifiers"][0]["value"]}
    assert ids == {"arXiv:2209.12866", "arXiv:2307.08198"}
    readme = (ROOT / "README.md").read_text()
    assert "@inproceedings{lu2022sapa" in readme and "arXiv:2307.08198" in readme and "arXiv:2209.12866" in readme
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_wheel_holds_exactly_the_package_and_its_metadata(tmp_path):
    """Build the wheel from a clean copy of the sources and list it."""
    import shutil
    import zipfile

    src = tmp_path / "src_copy"
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(SRC, src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.egg-info"))
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = out.glob("sapa-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    expected_pkg = {str(p.relative_to(SRC)).replace(os.sep, "/") for p in (SRC / "sapa").rglob("*.py")
                    if "__pycache__" not in p.parts} | {"sapa/py.typed"}
    dist = {n for n in names if n.startswith("sapa-")}
    assert names - dist == expected_pkg
    base = whl.name.split("-py3")[0]
    assert dist == {f"{base}.dist-info/{f}" for f in
                    ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt", "licenses/LICENSE")}
    meta = zipfile.ZipFile(whl).read(f"{base}.dist-info/METADATA").decode()
    assert "Classifier: Typing :: Typed" in meta and "Provides-Extra: docs" in meta
    assert "Project-URL" not in meta  # none exists yet; none is invented
