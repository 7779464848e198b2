# `make demo` and `make test` work on a fresh machine with only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test stress lint bench schema clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[postgres,dev,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eventctx demo

test: $(STAMP)
	$(BIN)/python -m pytest

stress: $(STAMP)
	EVENTCTX_CRASH_KILLS=$${EVENTCTX_CRASH_KILLS:-400} $(BIN)/python -m pytest -q -s tests/test_crash.py tests/test_fuzz.py tests/stress_server_restart.py

lint: $(STAMP)
	$(BIN)/ruff check eventctx tests tools
	$(BIN)/ruff format --check eventctx tests tools
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m tools.bench

schema: $(STAMP)
	$(BIN)/python tools/dump_schema.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
