# memprop: two commands on a fresh machine.
#   make demo   create .venv, install memprop (torch pinned), run the main job
#   make test   same install, then the test suite (files in parallel: TEST_WORKERS)
#   make lint   same install, then ruff and mypy (rules: pyproject.toml)
# Override the torch install, e.g. for a CUDA build:
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# test files run in parallel, each file whole in one worker (its module fixtures built
# once): one worker per core, at most 4; TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= auto
EXTRAS      ?= test,hf,ray

BIN   := $(VENV)/bin
STAMP := $(VENV)/.memprop-installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install  ## writes reports/demo/ (ignored by git); reports/quickstart/ is the committed copy
	$(BIN)/memprop sweep experiments/quickstart.toml --db reports/demo/results.sqlite
	$(BIN)/memprop report reports/demo/results.sqlite -o reports/demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

lint: install  ## ruff (pyflakes, imports, bugbear, style) and mypy, as configured in pyproject.toml
	$(BIN)/ruff check memprop tests benchmarks experiments
	$(BIN)/mypy

bench: install  ## writes benchmarks/results/*.json and *.md
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
