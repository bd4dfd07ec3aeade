# make test: set up .venv from nothing (CPU torch, the pinned CUTLASS DSL) and run the CPU suite.
# make demo: same setup, then the main job (GPU: the quick benchmark; CPU: a small MoBA layer).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: test demo setup clean gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch only when none is there (a plain 'pip install torch' would pull a CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

# On the GPU machine (see ../shared/gpu/README.md): source .gpu/setup.sh first.
gpu-test:
	python3 -m pytest -m gpu -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
