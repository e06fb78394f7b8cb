"""The documentation runs: every ```python block of README.md and docs/*.md, every docstring
example (doctest) of the package, and the API reference build (mkdocs --strict, offline)."""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("**/*.md")])
DOCS = sorted(set(DOCS))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block (```py too), in order."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        lang = m.group("lang").strip().split()[0].lower() if m.group("lang").strip() else ""
        if lang in ("python", "py", "python3"):
            indent = len(m.group("indent"))
            body = "".join(line[indent:] if len(line) >= indent else line
                           for line in m.group("body").splitlines(keepends=True))
            out.append((text.count("\n", 0, m.start()) + 1, body))
    return out


def test_block_extraction_finds_blocks():
    """The extractor itself: a python block is found, bash/text blocks are not."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.md"
        p.write_text("a\n```bash\nexit 1\n```\n\n```python\nx = 1\n```\n* item\n  ```python\n  y = 2\n  ```\n")
        assert python_blocks(p) == [(6, "x = 1\n"), (10, "y = 2\n")]
    assert python_blocks(ROOT / "README.md"), "README.md lost its python example"


_CASES = [(p, line, code) for p in DOCS for line, code in python_blocks(p)]


@pytest.mark.parametrize("path,line,code", _CASES,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in _CASES])
def test_markdown_python_block_runs(path, line, code, tmp_path, monkeypatch):
    """Each block runs as-is, in a fresh namespace, from a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"{path.relative_to(ROOT)}:{line}", "exec")
    exec(compiled, {"__name__": "__doc_block__"})


def _modules() -> list[str]:
    """Every module of the package whose source has a docstring example (``>>>``); found by
    reading the files, so that collection imports only those (not triton, transformers, ...)."""
    names = []
    for path in sorted((SRC / "sapa").rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        name = ".".join(parts)
        if name != "sapa.__main__" and ">>>" in path.read_text(encoding="utf-8"):
            names.append(name)
    return names


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = []
    for name in _modules():
        try:
            mod = importlib.import_module(name)
        except ImportError as err:  # an optional backend missing on this machine (e.g. triton)
            out.append(pytest.param(name, None, marks=pytest.mark.skip(reason=f"{name}: {err}")))
            continue
        for t in finder.find(mod, name):
            if t.examples and (t.filename or "").startswith(str(SRC)):
                out.append(pytest.param(name, t, id=t.name))
    return out


@pytest.mark.parametrize("module,test", _doctests())
def test_docstring_examples(module, test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=lambda s: sys.stdout.write(s))
    assert result.failed == 0, f"{test.name}: {result.failed} of {result.attempted} examples failed"


def test_doctests_are_collected():
    names = {p.id for p in _doctests() if p.values[1] is not None}
    assert "sapa.complexity.MacCounter" in names and "sapa" in names, sorted(names)


def _docs_extra_missing() -> str | None:
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
    return ", ".join(missing) or None


def test_api_reference_builds_without_warnings(tmp_path):
    missing = _docs_extra_missing()
    if missing:
        pytest.skip(f"the docs extra is not installed ({missing}); pip install -c constraints.txt '.[docs]'")
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    # the reference really comes from the docstrings
    nn_page = (site / "api" / "nn" / "index.html").read_text(encoding="utf-8")
    assert "SAPAB" in nn_page and "low-rank bilinear similarity" in nn_page
    fn_page = (site / "api" / "functional" / "index.html").read_text(encoding="utf-8")
    assert "sapa_deform" in fn_page
    assert (site / "SEMANTICS" / "index.html").is_file()
