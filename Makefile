# prefect-maintenance: every command a user or CI needs.
SHELL := /bin/bash
PYTHON := .venv/bin/python
UV := $(shell command -v uv 2>/dev/null || echo .venv-tools/bin/uv)
STATE_DIR ?= .local/stack
PORT ?= 4200

.PHONY: install demo test lint up down status deploy worker bench screenshots clean

# The Prefect of .venv: the lock's (the newest) by default; `make install
# PREFECT_VERSION=3.4.25` installs that version's locked requirements (prefect-versions/)
# instead, for a worker that runs the Prefect of its server. The install made last is the
# one every other target keeps using (its stamp tells which); `make install` alone goes
# back to the lock.
PREFECT_VERSION ?=
SUPPORTED_PREFECT_VERSIONS := $(sort $(patsubst prefect-versions/%.txt,%,$(wildcard prefect-versions/*.txt)))
ifneq ($(PREFECT_VERSION),)
ifeq ($(filter $(PREFECT_VERSION),$(SUPPORTED_PREFECT_VERSIONS)),)
$(error PREFECT_VERSION=$(PREFECT_VERSION) is not a supported Prefect version; supported: $(SUPPORTED_PREFECT_VERSIONS))
endif
endif
INSTALL_STAMP := .venv/.installed-prefect-$(or $(PREFECT_VERSION),lock)
VENV := $(if $(PREFECT_VERSION),$(INSTALL_STAMP),$(or $(firstword $(wildcard .venv/.installed-prefect-*)),$(INSTALL_STAMP)))

install: $(INSTALL_STAMP)

# $(1): more options of `uv sync` (groups to leave out, --reinstall).
define sync_venv
@if ! command -v uv >/dev/null 2>&1 && [ ! -x .venv-tools/bin/uv ]; then \
	python3 -m venv .venv-tools && .venv-tools/bin/pip install --quiet uv; fi
@rm -f .venv/.installed-prefect-*
UV_PROJECT_ENVIRONMENT=.venv $(UV) sync --frozen --all-groups $(1)
endef

# Back from another version's install, every package is installed again: a package that
# changed hands between distributions (griffe's module, from griffe 1 to griffelib 2) is
# otherwise deleted by the uninstall of its old owner.
.venv/.installed-prefect-lock: pyproject.toml uv.lock
	$(call sync_venv,$(if $(wildcard .venv/.installed-prefect-[0-9]*),--reinstall))
	@touch $@

# The kubernetes group's prefect-kubernetes needs the lock's Prefect.
.venv/.installed-prefect-%: pyproject.toml uv.lock prefect-versions/%.txt
	$(call sync_venv,--no-group kubernetes)
	$(UV) pip install --python .venv/bin/python -r prefect-versions/$*.txt
	@touch $@

demo: $(VENV)
	$(PYTHON) -m localstack.demo

# Two test processes, each with its own PostgreSQL and Prefect servers, sharing the suite
# by group (tests/conftest.py says which tests stay together).
TEST_PROCESSES ?= 2

test: $(VENV)
	$(PYTHON) -m pytest -n $(TEST_PROCESSES) --dist loadgroup

lint: $(VENV)
	$(PYTHON) -m ruff check .

up: $(VENV)
	$(PYTHON) -m localstack.stack up --foreground --state-dir $(STATE_DIR) --port $(PORT)

down: $(VENV)
	$(PYTHON) -m localstack.stack down --state-dir $(STATE_DIR) --port $(PORT)

status: $(VENV)
	$(PYTHON) -m localstack.stack status --state-dir $(STATE_DIR) --port $(PORT)

# Against PREFECT_API_URL: the work pool, its queue (limit 1) and every deployment of prefect.yaml.
deploy: $(VENV)
	$(PYTHON) -m deploy.bootstrap

# The one worker of the maintenance pool and queue.
worker: $(VENV)
	$(PYTHON) -m deploy.worker

# Side by side with Prefect's own ways, on an embedded PostgreSQL + Prefect server of their
# own (state in .local/bench). The population database for reconcile and health (1,000,000
# runs, about ten minutes to seed) is kept there for the next run.
# The events database (10,000,000 events with their resources and a log table of
# 30,000,000 lines, over an hour to seed, about 45 GB) is kept there too; seeding stops
# short when the disk has less than 12 GB left.
BENCH_RUNS ?= 100000
BENCH_POPULATION ?= 1000000
BENCH_EVENTS ?= 10000000
BENCH_LOGS ?= 30000000
bench: $(VENV)
	$(PYTHON) -m bench.retention --runs $(BENCH_RUNS) --json .local/bench/retention.json
	$(PYTHON) -m bench.events --events $(BENCH_EVENTS) --logs $(BENCH_LOGS) --json .local/bench/events.json
	$(PYTHON) -m bench.reconcile --runs $(BENCH_POPULATION) --json .local/bench/reconcile.json
	$(PYTHON) -m bench.health --runs $(BENCH_POPULATION) --json .local/bench/health.json

# The demo's reports in a headless Chromium (Debian's package, installed when missing),
# 1,600 px wide, into docs/screenshots/ (the README's pictures).
screenshots: install
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core; }
	$(PYTHON) -m localstack.screenshots

clean: down
	rm -rf .local
