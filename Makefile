# make test: set up .venv from nothing (CPU torch, the pinned CUTLASS DSL) and run the CPU suite,
#   then the toolchain gate (test-cu13).
# make test-cu13: set up .venv-cu13 (CPU torch, nvidia-cutlass-dsl[cu13], the DSL libraries a
#   CUDA-13 PyTorch user gets) and run the CPU compile tests (ptxas spills, instructions) with it.
# make demo: same setup, then the main job (GPU: the quick benchmark; CPU: a small MoBA layer).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
VENV13 ?= .venv-cu13
PY13    = $(VENV13)/bin/python
STAMP13 = $(VENV13)/.installed
# the CPU compile tests (every kernel configuration builds, uses its instructions, does not spill)
COMPILE_TESTS = $(sort $(wildcard tests/test_*compile.py))
# pytest-xdist workers: the suite is single-threaded kernel compiles (MLIR + ptxas), so one
# worker a core about halves CI's wall time; capped so that a big machine does not start dozens
# of processes that each import torch and the DSL
XDIST   = -n auto --maxprocesses=8

.PHONY: test test-main test-cu13 demo setup setup-cu13 clean gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch only when none is there (a plain 'pip install torch' would pull a CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# with the cu13 libraries next to the default (cu12) ones, the DSL loads the newest flavour the
# driver allows: cu13 on a machine without a driver (CPU, CI) and on CUDA-13 GPU machines
$(STAMP13): pyproject.toml
	test -x $(PY13) || $(PYTHON) -m venv $(VENV13)
	$(PY13) -m pip install -q --upgrade pip
	$(PY13) -c "import torch" 2>/dev/null || $(PY13) -m pip install -q torch==2.13.0
	$(PY13) -m pip install -q -e ".[test,cu13]"
	$(PY13) -c "import cutlass._mlir._mlir_libs._cutlass_ir as m; assert '.cu13.' in m.__file__, m.__file__"
	touch $(STAMP13)

setup-cu13: $(STAMP13)

test: test-main test-cu13

test-main: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

test-cu13: $(STAMP13)
	$(PY13) -m pytest -q $(XDIST) $(COMPILE_TESTS)

demo: $(STAMP)
	$(PY) examples/demo.py

# On the GPU machine (see ../shared/gpu/README.md): source .gpu/setup.sh first.
gpu-test:
	python3 -m pytest -m gpu -q

clean:
	rm -rf $(VENV) $(VENV13) .pytest_cache .hypothesis build *.egg-info
