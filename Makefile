# The README's commands. Everything runs from the project's own virtualenv (.venv).
#   make test   PYTEST_ARGS="tests/unit -x"    lint gates + the whole pytest suite
#   make demo   DEMO_ARGS="..."                the demo on the embedded default
#   make bench  BENCH_ARGS="..."               the benchmark (needs the services): 3 rounds
#                                              of chains, sagas and DBOS (if bench-peers ran),
#                                              then the order choreography's events/s
#   make bench-io                              the I/O-bound case by pool, plot in docs/bench.png
#   make bench-peers                           DBOS into .venv-peers, for make bench's rounds
#   make bench-scale SCALE_ARGS="--sizes 1000,100000"   flat at a million finished sagas?
#   make chaos  CHAOS_ARGS="--quick"           the fault matrix on its own servers (not in make test)
#   make lint                                  ruff, ruff format --check, import-linter, mypy
#   make test-lowest                           unit + a few integration tests on the lowest
#                                              declared versions of the direct dependencies
#   make clean                                 remove .demo and tool caches

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PYTEST_ARGS ?=
LOWEST := .venv-lowest
LOWEST_EXTRAS := redis postgres psycopg prometheus flower rabbitmq
LOWEST_TESTS ?= tests/unit tests/integration/test_end_to_end.py tests/integration/test_store_contract.py tests/integration/test_migrations.py tests/integration/test_sagas_page.py tests/integration/test_dead_letters.py
DEMO_ARGS ?=
BENCH_ARGS ?= --rounds 3
CHOREO_BENCH_ARGS ?= --n 500
BENCH_IO_ARGS ?= --io-matrix --n 1000 --latency-n 100 --plot docs/bench.png
BENCH_STAMP := $(VENV)/.bench-installed
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
SCALE_ARGS ?=
CHAOS_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test test-lowest demo bench bench-io bench-peers bench-scale chaos lint services clean

help:
	@echo "make test    [PYTEST_ARGS=...]  ruff + import-linter + mypy + pytest (starts services if needed)"
	@echo "make demo    [DEMO_ARGS=...]    run the demo (python -m workers.demo)"
	@echo "make bench   [BENCH_ARGS=...]   bench/bench.py (default: --rounds 3), then bench/choreography_bench.py"
	@echo "make bench-io [BENCH_IO_ARGS=...] the I/O-bound case on prefork/threads/gevent + plot"
	@echo "make bench-peers                DBOS in .venv-peers: make bench then runs it too"
	@echo "make bench-scale [SCALE_ARGS=...] scan, relay, list, show, metrics, Sagas page at 1k/100k/1M finished sagas; prune rows/s"
	@echo "make chaos   [CHAOS_ARGS=...]   the fault matrix (python -m chaos; own PostgreSQL/Redis)"
	@echo "make lint                      ruff check, ruff format --check, lint-imports, mypy"
	@echo "make test-lowest               unit + some integration tests on the lowest declared versions"
	@echo "make clean                     remove .demo and caches"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalled only when pyproject.toml changes; the stamp is written only on success.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

services:
	bash scripts/ensure_services.sh

test: $(STAMP) services
	bash scripts/install_browser.sh
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy celery_sagas
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A fresh venv whose direct dependencies are pinned to the floors pyproject.toml declares
# (scripts/lowest_constraints.py); the dev tools are not pinned.
test-lowest: services
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(PYTHON) scripts/lowest_constraints.py $(LOWEST_EXTRAS) > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install --disable-pip-version-check -q \
		-c $(LOWEST)/constraints.txt -e ".[dev,$(shell echo $(LOWEST_EXTRAS) | tr ' ' ',')]"
	@echo "lowest versions:"; $(LOWEST)/bin/python -m pip freeze | grep -i -E \
		'^(celery|kombu|sqlalchemy|alembic|click|amqp|redis|psycopg2-binary|psycopg|psycopg-binary|flower|prometheus.client)=='
	$(LOWEST)/bin/python -m pytest $(LOWEST_TESTS)

demo: $(STAMP)
	$(BIN)/python -m workers.demo $(DEMO_ARGS)

# matplotlib for the bench's plot (the `bench` extra), next to the dev install
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
	@touch $@

bench: $(BENCH_STAMP) services
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(BIN)/python bench/choreography_bench.py $(CHOREO_BENCH_ARGS)

bench-io: $(BENCH_STAMP) services
	$(BIN)/python bench/bench.py $(BENCH_IO_ARGS)

# DBOS in a virtualenv of its own: its dependencies never change what the project runs on
$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --disable-pip-version-check -q 'dbos>=3.4,<4' 'psycopg2-binary>=2.9.9'
	@touch $@

bench-peers: $(PEERS_STAMP)
	@$(PEERS)/bin/python -m pip show dbos | sed -n '1,2p'
	@echo "make bench now runs DBOS's workflow in its rounds (bench/dbos_peer.py)"

# Seeds throwaway databases (1M sagas: ~7 GB, minutes): --sizes 1000,100000 for a quick run.
bench-scale: $(STAMP) services
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# Starts its own PostgreSQL (port 55432) and redis-server (6390); RabbitMQ gets a vhost of its own.
chaos: $(STAMP)
	$(BIN)/python -m chaos $(CHAOS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy celery_sagas

clean:
	rm -rf .demo .pytest_cache .ruff_cache .mypy_cache .import_linter_cache build dist $(LOWEST) $(PEERS)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -type d -name '*.egg-info' -prune -exec rm -rf {} +
