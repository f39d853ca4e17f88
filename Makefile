# `make run` and `make test` each set up everything they need on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the CPU wheel; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the project `make run` runs; any other: `make run PROJECT=path/to/project.py`
PROJECT ?= examples.fraud_shop.project:project

run: $(STAMP)
	$(VENV)/bin/weir --project $(PROJECT) demo

test: $(STAMP)
	$(PY) -m mypy streams sinks models examples   # strict, as configured in pyproject.toml
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) load_tests/pipeline.py --project $(PROJECT)

clean:
	rm -rf .weir
