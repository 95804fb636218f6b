# Set-up and everyday commands. `make quickstart` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of torch 2.13.0; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install quickstart test lint docs constraints bench

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

# Shell scripts (shellcheck) and the Dockerfile (hadolint); CI runs this before the tests.
lint: install
	$(VENV)/bin/shellcheck -x launch/slurm/*.sbatch launch/slurm/common.sh .ci/run benchmarks/gpu_suite.sh
	$(VENV)/bin/hadolint docker/Dockerfile

# The site over docs/ into site/; its front page is this README with its links made relative to docs/. --strict: a
# broken link or a page left out of the nav fails.
docs: install
	$(PY) -m pip install -q -e ".[docs]"
	sed -e 's#](docs/#](#g' README.md > docs/index.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The Docker image's pins: every package of the venv the tests ran in (torch without the CPU build's +cpu).
constraints: install
	{ echo "# pip freeze of the venv the tests ran in (make constraints), read by docker/Dockerfile;"; \
	  echo "# torch is pinned without +cpu, so the image gets the CUDA build of the same version."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > docker/constraints.txt

bench: install
	$(PY) -m pip install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(PY) benchmarks/bench_step.py --latents 16384 --repeats 3
	$(PY) benchmarks/bench_expert_parallel.py
	$(PY) benchmarks/bench_engines.py
