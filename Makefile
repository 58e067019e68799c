.DEFAULT_GOAL := all
.PHONY: install format lint mypy test run bench bench-quick all clean

PYTHON ?= python3
sources = broker tests
venv = .venv/bin

install: .venv/installed

# Rebuilt only when pyproject.toml changes; a fresh clone needs nothing but Python >= 3.11.
.venv/installed: pyproject.toml
	$(PYTHON) -m venv .venv
	$(venv)/pip install --quiet --upgrade pip
	$(venv)/pip install --quiet -e '.[dev,fast]'
	touch $@

format: install
	$(venv)/ruff check --fix $(sources)
	$(venv)/ruff format $(sources)

lint: install
	$(venv)/ruff check $(sources)
	$(venv)/ruff format --check $(sources)

mypy: install
	$(venv)/mypy

# Starts its own Redis-compatible servers; nothing to install or run first.
test: install
	$(venv)/ruff check $(sources)
	$(venv)/mypy
	$(venv)/pytest

# Starts an embedded Redis-compatible server under .broker/ unless BROKER_REDIS_URL is set.
run: install
	$(venv)/python -m broker serve --config config/broker.toml

all: lint mypy test

clean:
	rm -rf .mypy_cache .pytest_cache .ruff_cache htmlcov .coverage
