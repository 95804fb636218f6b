# Set-up and everyday commands. `make quickstart` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of torch 2.13.0; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install quickstart test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]"
	touch $@

quickstart: install
	HF_HUB_OFFLINE=1 $(PY) launch/train.py

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(PY) benchmarks/bench_step.py --latents 16384 --repeats 3
	$(PY) benchmarks/bench_expert_parallel.py
