# loraserve: `make serve` runs the demo server, `make test` runs the whole test suite.
# Both create .venv and install everything on first use (torch 2.13.0 CPU build first, so
# that no dependency pulls a multi-GB CUDA build of torch).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve demo test lint format proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Builds the demo model and adapters on first run (cached), then serves them on
# 127.0.0.1:50051 (gRPC) with metrics on 127.0.0.1:9090/metrics.
serve: install
	$(BIN)/loraserve demo
	$(BIN)/loraserve serve

demo: install
	$(BIN)/loraserve demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: install
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/loraserve bench --scenario all --plot

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
