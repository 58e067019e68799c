.DEFAULT_GOAL := all
.PHONY: install format lint mypy test run bench bench-quick bench-instructions all clean

PYTHON ?= python3
sources = broker tests bench
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

# Benchmark kit (bench/README.md): every issue-4 scenario against the broker and its baselines
# (trivial aiohttp, in-memory long poll, Nchan). Writes bench/results/<date>.{json,md,png}.
bench: install
	$(venv)/pip install --quiet -e '.[dev,fast,bench]'
	$(venv)/python -m bench.run

# The same in under two minutes (2,000 waiters, shorter runs).
bench-quick: install
	$(venv)/pip install --quiet -e '.[dev,fast,bench]'
	$(venv)/python -m bench.run --quick

# Instructions per request under callgrind (needs valgrind): a repeatable A/B for request-path
# changes, e.g. `make bench-instructions ARGS="--ref HEAD~1,HEAD"` or ARGS="--alloc pymalloc,malloc".
bench-instructions: install
	$(venv)/python -m bench.instructions $(ARGS)

all: lint mypy test

clean:
	rm -rf .mypy_cache .pytest_cache .ruff_cache htmlcov .coverage
