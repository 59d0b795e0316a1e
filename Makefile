# The two commands of the README: `make demo` and `make test`. Each sets itself up from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: demo test install dev lint typecheck pytest system-deps bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build of this version installs from local disk in seconds.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

demo: install
	$(BIN)/gossamer demo --summary-json demo-summary.json

# System tools for the lab and the netlab tests (ip, tc, iptables, sysctl, iperf3). Installed only when
# running as root with apt-get available; otherwise the netlab tests skip and say what is missing.
system-deps:
	@bash scripts/system-deps.sh

lint: dev
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

typecheck: dev
	$(BIN)/mypy --strict

pytest: dev system-deps
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing'; fi; exit $$rc

test: lint typecheck pytest

bench: install
	$(BIN)/gossamer bench loop

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
