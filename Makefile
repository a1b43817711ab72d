# Two commands do all set-up on a fresh machine:  make demo  |  make test
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo-cascaded-tanks
DEMO_RUN ?= runs/demo-cascaded-tanks-hybrid
# the local model store (the registry); export BENTOML_HOME to use another
BENTOML_HOME ?= $(CURDIR)/.bentoml
DEMO_PORT ?= 3000

.PHONY: demo test test-portable bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# stock pip 23 cannot resolve bentoml together with wandb: upgrade it first
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# compiled bytecode: this environment may set PYTHONDONTWRITEBYTECODE, and imports are ~2x slower without it
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	@summary=$$($(BIN)/twin-generate system=cascaded_tanks n_scenarios=256 seed=0 out_dir=$(DEMO_DIR) \
	    workers=0 plot=true | tail -n 1) && echo "== dataset: $$summary" && cat "$$summary" && echo && \
	    echo "== overview plot: $(DEMO_DIR)/overview.png"
	@summary=$$($(BIN)/twin-train experiment=cascaded_tanks_hybrid data_dir=$(DEMO_DIR) out_dir=$(DEMO_RUN) \
	    trainer.max_epochs=60 model.optim.curriculum_every=6 logger=csv | tail -n 1) && \
	    echo "== training run: $$summary" && cat "$$summary" && echo && \
	    echo "== report: $(DEMO_RUN)/report.html"
	@summary=$$(BENTOML_HOME=$(BENTOML_HOME) $(BIN)/twin-export run_dir=$(DEMO_RUN) name=demo_cascaded_tanks_hybrid \
	    stage=production | tail -n 1) && echo "== exported: $$summary" && cat "$$summary" && echo && \
	    BENTOML_HOME=$(BENTOML_HOME) $(BIN)/twin-models list
	@echo "== serving demo_cascaded_tanks_hybrid:production on 127.0.0.1:$(DEMO_PORT), one request:"
	@BENTOML_HOME=$(BENTOML_HOME) $(BIN)/twin-serve model=demo_cascaded_tanks_hybrid:production port=$(DEMO_PORT) \
	    > $(DEMO_RUN)/serve.log 2>&1 & pid=$$!; \
	    $(BIN)/python -m serving.demo --url http://127.0.0.1:$(DEMO_PORT) --wait 90; rc=$$?; \
	    kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; exit $$rc

# first ruff (pinned in dev, settings in pyproject.toml): `ruff check .`, `ruff format --check .`;
# a lint or format finding fails `make test` before any test runs (seconds); then the test files
# run on TEST_WORKERS processes (pytest-xdist), each file whole on one worker so its module
# fixtures (trained models, live servers) are built once: ~8 min on 2 cores instead of ~12;
# then the numeric tests once more on narrowed SIMD paths (tests/run_portable.py): tolerances must
# hold on any x86-64 CPU, AVX-512 or not, and with onnxruntime's graph optimizations at basic
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(MAKE) --no-print-directory test-portable

test-portable: $(STAMP)
	$(BIN)/python tests/run_portable.py -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/solver.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/export.py

clean:
	rm -rf $(VENV) data/demo-* runs/demo-* .bentoml .pytest_cache
