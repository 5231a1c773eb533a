# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint gpu-check

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m ioattn demo

test: setup
	$(PY) -m pytest -n 2 -q tests

test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check src tests scripts
