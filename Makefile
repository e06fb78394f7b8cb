# The README's two commands live here: `make demo` and `make test`. Each does all of its own set-up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.sapa-installed

.PHONY: demo test test-slow bench docs setup clean

setup: $(STAMP)

# torch/torchvision come from the package registry on purpose (--isolated ignores the machine's
# pip config, whose pre-seeded CPU-only torch wheel cannot import torchvision 0.28.0); versions are
# read from constraints.txt, the one place they are pinned.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --isolated -q $$(grep -E '^(torch|torchvision)==' constraints.txt)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sapa compare

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-slow: $(STAMP)
	SAPA_SLOW=1 $(PY) -m pytest -q -n 2 --dist loadgroup -m slow

bench: $(STAMP)
	$(VENV)/bin/sapa bench

# API reference from the docstrings into build/site (offline; the `docs` extra is in `.[test]`)
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# OpenMMLab integration (sapa.integrations.openmmlab): its own venv, so mmengine / mmcv-lite / mmdet /
# mmseg never enter the default test install. Same torch set-up as above, then the openmmlab extra.
MM_VENV  ?= .venv-openmmlab
MM_PY    := $(MM_VENV)/bin/python
MM_STAMP := $(MM_VENV)/.sapa-installed

.PHONY: test-openmmlab

$(MM_STAMP): pyproject.toml constraints.txt
	test -x $(MM_PY) || $(PYTHON) -m venv $(MM_VENV)
	$(MM_PY) -m pip install --isolated -q $$(grep -E '^(torch|torchvision)==' constraints.txt)
	$(MM_PY) -m pip install -q -c constraints.txt -e '.[openmmlab,test]'
	touch $(MM_STAMP)

test-openmmlab: $(MM_STAMP)
	$(MM_PY) -m pytest -q -n 2 --dist loadgroup tests/integrations
