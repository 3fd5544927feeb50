# tl: two commands for a newcomer: `make train` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP_FLAGS ?= -q -c constraints.txt

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint format bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create or update .venv with tl installed (editable) and the test tools

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[dev]"
	@touch $(STAMP)

train: install ## train efficientnet_lite0 on the built-in sample (offline, a few minutes on 2 CPU cores)
	$(BIN)/tl train

# Tests run in parallel, one worker per core, each file on one worker (module fixtures built once),
# one torch thread per worker (two workers with two threads each oversubscribe a 2-core machine).
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: install ## the whole test suite (slow tests included)
	$(PYTEST)

test-fast: install ## the suite without slow-marked tests
	$(PYTEST) -m "not slow"

lint: install ## ruff check + format check
	$(BIN)/ruff check tl_cli tests scripts
	$(BIN)/ruff format --check tl_cli tests scripts

format: install ## ruff fix + format
	$(BIN)/ruff check --fix tl_cli tests scripts
	$(BIN)/ruff format tl_cli tests scripts

bench: install ## CIFAR-10 subset benchmark (feature extraction vs finetune); writes docs/benchmarks.md
	$(BIN)/python scripts/bench_cifar.py

clean: ## remove build outputs and run dirs (keeps .venv)
	rm -rf build dist *.egg-info outputs multirun .pytest_cache .ruff_cache
