# prefect-maintenance: every command a user or CI needs.
SHELL := /bin/bash
PYTHON := .venv/bin/python
UV := $(shell command -v uv 2>/dev/null || echo .venv-tools/bin/uv)
STATE_DIR ?= .local/stack
PORT ?= 4200

.PHONY: install demo test lint up down status deploy worker bench clean

install: .venv/.installed

.venv/.installed: pyproject.toml uv.lock
	@if ! command -v uv >/dev/null 2>&1 && [ ! -x .venv-tools/bin/uv ]; then \
		python3 -m venv .venv-tools && .venv-tools/bin/pip install --quiet uv; fi
	UV_PROJECT_ENVIRONMENT=.venv $(UV) sync --frozen --all-groups
	@touch $@

demo: install
	$(PYTHON) -m localstack.demo

test: install
	$(PYTHON) -m pytest

lint: install
	$(PYTHON) -m ruff check .

up: install
	$(PYTHON) -m localstack.stack up --foreground --state-dir $(STATE_DIR) --port $(PORT)

down: install
	$(PYTHON) -m localstack.stack down --state-dir $(STATE_DIR) --port $(PORT)

status: install
	$(PYTHON) -m localstack.stack status --state-dir $(STATE_DIR) --port $(PORT)

# Against PREFECT_API_URL: the work pool, its queue (limit 1) and every deployment of prefect.yaml.
deploy: install
	$(PYTHON) -m deploy.bootstrap

# The one worker of the maintenance pool and queue.
worker: install
	$(PYTHON) -m deploy.worker

# Side by side with Prefect's own ways, on an embedded PostgreSQL + Prefect server of their
# own (state in .local/bench). The population database for reconcile and health (1,000,000
# runs, about ten minutes to seed) is kept there for the next run.
BENCH_RUNS ?= 100000
BENCH_POPULATION ?= 1000000
bench: install
	$(PYTHON) -m bench.retention --runs $(BENCH_RUNS) --json .local/bench/retention.json
	$(PYTHON) -m bench.reconcile --runs $(BENCH_POPULATION) --json .local/bench/reconcile.json
	$(PYTHON) -m bench.health --runs $(BENCH_POPULATION) --json .local/bench/health.json

clean: down
	rm -rf .local
