# Two commands for a fresh machine:
#   make serve   set up and start a server on 127.0.0.1:8443 (data in ./var)
#   make test    set up and run formatting, lint, type checks and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8443
DATA ?= var

.PHONY: serve test check lint typecheck pytest test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(BIN)/bastion server run --data $(DATA) --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy --strict
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test-slow: $(VENV)/.installed-dev
	$(BIN)/pytest -m slow

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/relay.py

# Coverage-guided fuzzing of the decoders for FUZZ_SECONDS (default 60); crashes land in fuzz/.
.PHONY: fuzz
fuzz: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p fuzz/corpus
	$(BIN)/python fuzz/fuzz_decoders.py -max_total_time=$${FUZZ_SECONDS:-60} \
		-artifact_prefix=fuzz/ fuzz/corpus

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
