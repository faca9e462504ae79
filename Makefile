# Two commands for a fresh machine:
#   make serve   set up and start a server on 127.0.0.1:8443 (data in ./var)
#   make test    set up and run formatting, lint, type checks and the whole test suite
# Both install exactly the versions in requirements*.txt (hashes checked); `make lock`
# refreshes those files from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8443
DATA ?= var
UV_VERSION := 0.13.9
LOCK_FLAGS := $(if $(UPGRADE),--upgrade) --universal --python-version 3.11 --generate-hashes --quiet \
	--custom-compile-command "make lock"
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps

.PHONY: serve test check-lock lock lint test-slow bench fuzz clean web

check-lock:
	@$(PYTHON) tools/lock.py check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements.txt requirements-build.txt | check-lock $(BIN)/python
	$(PIP_LOCKED) -r requirements-build.txt
	$(PIP_LOCKED) -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml requirements-dev.txt $(VENV)/.installed | check-lock
	$(PIP_LOCKED) -r requirements-dev.txt
	touch $@

serve: check-lock $(VENV)/.installed
	$(BIN)/bastion server run --data $(DATA) --host $(HOST) --port $(PORT)

test: check-lock $(VENV)/.installed-dev
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/ruff check src tests bench tools
	$(BIN)/mypy --strict
	$(BIN)/pytest

# Resolve the locks again from pyproject.toml, keeping locked versions that still fit
# (`make lock UPGRADE=1` takes the newest its ranges allow). The runtime set is taken at
# the dev set's versions, so the tests run exactly what a server runs.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(PYTHON) tools/lock.py build-requires | $(BIN)/uv pip compile - $(LOCK_FLAGS) -o requirements-build.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o requirements-dev.txt
	$(BIN)/uv pip compile pyproject.toml -c requirements-dev.txt $(LOCK_FLAGS) -o requirements.txt
	$(PYTHON) tools/lock.py stamp

# Copy the browser app's third-party file (the QR decoder) from the pinned npm lock in web/;
# CI runs `python3 tools/vendor_web.py check` to prove the copy is current.
web:
	$(PYTHON) tools/vendor_web.py sync

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests bench tools
	$(BIN)/ruff check --fix src tests bench tools

test-slow: $(VENV)/.installed-dev
	$(BIN)/pytest -m slow

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/relay.py

# Coverage-guided fuzzing of the decoders for FUZZ_SECONDS (default 60); crashes land in fuzz/.
fuzz: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p fuzz/corpus
	$(BIN)/python fuzz/fuzz_decoders.py -max_total_time=$${FUZZ_SECONDS:-60} \
		-artifact_prefix=fuzz/ fuzz/corpus

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
