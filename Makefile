# Set-up and the two main jobs. Everything installs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The test extras need torch; pin the CPU build this machine kind carries on disk, so pip
# does not fetch a multi-GB CUDA build to satisfy the range in setup.py.
TORCH := torch==2.13.0
WORKDIR ?= runs/demo

.PHONY: demo test test-all lint bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,tpu,eval]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m tpullm.train --config=configs/demo.py --workdir=$(WORKDIR)

test: lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-all: $(VENV)/.test-installed
	JAX_PLATFORMS=cpu $(PY) -m pytest -q --runslow tests

clean:
	rm -rf $(VENV) runs
