# One command to run the platform, one to test it. Both build .venv from scratch when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start all four services in one process on the embedded defaults (SQLite + embedded bus).
run: $(STAMP)
	$(BIN)/huitou up

## ruff, mypy, then the whole test suite (starts its own PostgreSQL and Kafka-protocol broker).
## Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: the suite starts a few
## hundred Python processes, and each would otherwise compile every module it imports.
test: $(STAMP) lint $(BIN)/promtool browser
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q

## promtool (not on PyPI) for tests/deploy/test_alerts.py: unpacked from Debian's package.
$(BIN)/promtool: scripts/install-promtool.sh
	bash scripts/install-promtool.sh
	touch $@

## Debian's Chromium and a CJK font for the console's browser tests (tests/console/).
.PHONY: browser
browser:
	bash scripts/install-browser.sh

lint: $(STAMP)
	$(BIN)/ruff check libs services tests bench deploy
	$(BIN)/ruff format --check libs services tests bench deploy
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .huitou .pytest_cache .mypy_cache .ruff_cache

## Benchmarks (bench/README.md): quick takes minutes, full much longer; results in bench/results/.
.PHONY: bench bench-full bench-soak
bench: $(STAMP)
	$(BIN)/python -m bench quick

bench-full: $(STAMP)
	$(BIN)/python -m bench full

## The ten-minute soak alone (memory of every service under a steady stream), both modes.
bench-soak: $(STAMP)
	$(BIN)/python -m bench full --paths soak
