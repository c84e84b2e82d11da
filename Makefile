# Two entry points: `make demo` (the main job on a built-in default) and `make test`.
# Both create .venv when it is missing and are safe to run again.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint system-deps test-deps bench

setup: system-deps $(STAMP)

# torch first, pinned to the release whose CPU build this kind of machine provides: a bare
# `torch` requirement would pull a multi-GB CUDA build on a machine without a GPU.
$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# graphviz's `dot` renders circuit diagrams.
system-deps:
	@command -v dot >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq graphviz >/dev/null; \
	  else echo "install graphviz (the 'dot' program) with your package manager" >&2; exit 1; fi; }

# Chromium runs the interactive page test.
test-deps:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; \
	  else echo "install chromium for the interactive page test (it is skipped without it)" >&2; fi; }

demo: setup
	$(BIN)/circuits discover ioi

# The tests and every docstring's Examples (testpaths and --doctest-modules in pyproject.toml).
# two workers, one CPU thread each (tests/conftest.py); a file's tests stay on one worker, so
# its module fixtures are built once
test: setup test-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check circuits tasks tests benchmarks

bench: setup
	$(BIN)/python benchmarks/engine_speed.py
