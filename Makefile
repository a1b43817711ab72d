# Two commands do all set-up on a fresh machine:  make demo  |  make test
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo-cascaded-tanks

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# stock pip 23 cannot resolve bentoml together with wandb: upgrade it first
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# compiled bytecode: this environment may set PYTHONDONTWRITEBYTECODE, and imports are ~2x slower without it
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	@summary=$$($(BIN)/twin-generate system=cascaded_tanks n_scenarios=128 seed=0 out_dir=$(DEMO_DIR) \
	    workers=0 plot=true | tail -n 1) && echo "== $$summary" && cat "$$summary" && echo && \
	    echo "== overview plot: $(DEMO_DIR)/overview.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/solver.py

clean:
	rm -rf $(VENV) data/demo-* .pytest_cache
