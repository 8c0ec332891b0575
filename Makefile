# Two entry points: `make serve` (main job) and `make test` (style check, then the whole suite). Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Without CUDA, pin the local CPU torch wheel so pip never pulls the multi-GB CUDA build.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: serve test setup

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev,bench]'
	touch $@

setup: $(VENV)/.installed

serve: $(VENV)/.installed
	$(PY) -m runtime.quickstart

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider
