# The two commands of the README: `make demo` and `make test`. Everything else is set-up they need.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned to the release this machine serves from disk (pip is capped at 2.14.1).
TORCH := torch==2.14.1 torchvision==0.29.1
# pip warns about every missing local index directory; keep real errors, drop that noise.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test lint format bench tiny-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(PIP_QUIET)
	$(BIN)/pip install -q $(TORCH) -e '.[worker,test]' 2>&1 | $(PIP_QUIET)
	$(BIN)/python -c "import torch, transformers, celery, boto3, moto; print('installed: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/varco demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

tiny-model: $(STAMP)
	$(BIN)/varco make-tiny-model .models/tiny-varco

bench: $(STAMP)
	$(BIN)/python bench/engine_cpu.py

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache .hypothesis
