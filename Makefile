# Two entry points: `make run` (install + full pipeline on the embedded default) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MPLBACKEND := Agg

.PHONY: run test quick postgres lint format typecheck install bench clean serve stop deploy worker compare

# uv (from PyPI, as pip) resolves, downloads and installs in parallel where pip goes one package after
# another: the run set in 28 s instead of 66 s on 2 cores, the same versions (torch is pinned).
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
UV_INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python

# `make run` installs what the pipeline needs; the tests' extras (S3 and PostgreSQL clients, moto, Dask,
# real scene crops, linters) would add minutes to it. An environment with them has the rest too.
# Byte-code is compiled after the install on every core (neither uv nor pip does by default): without it, a
# shell with PYTHONDONTWRITEBYTECODE=1 (as on this project's machines) recompiles every import in every
# process (28.7 s instead of 13.1 s to import the pipeline's libraries). The packages' own test folders
# (3,600 of 21,000 files, never imported here) are left out: 27 s instead of 35 s on 2 cores. compileall's
# complaints about files no Python 3 imports (old test data inside packages) are dropped, as pip drops them.
COMPILE = { $(BIN)/python -m compileall -q -j 0 -x '[/\\]tests?[/\\]' $(VENV)/lib >/dev/null 2>&1 || true; }
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	[ $(TEST_STAMP) -nt pyproject.toml ] || { $(UV_INSTALL) -e . && $(COMPILE); }
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(UV_INSTALL) -e '.[test]'
	$(COMPILE)
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/ms2rgb run

# Everything CI checks: lint, format, types, then every test (slow ones included).
# Two pytest-xdist workers, a test file each at a time (tests/conftest.py: longest files first, OpenMP threads
# that sleep while they wait); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: lint typecheck postgres
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# The inner loop: no pipeline, server or multi-minute tests (about a minute).
quick: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# tests/test_team_services.py starts a PostgreSQL server of its own from Debian's package `postgresql`.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The folders install as ms2rgb.*; link them under that name so mypy sees the imported module names.
typecheck: $(TEST_STAMP)
	mkdir -p .typecheck/ms2rgb
	for d in tasks models flows; do ln -sfn ../../$$d .typecheck/ms2rgb/$$d; done
	$(BIN)/mypy -p ms2rgb

# A local Prefect server (127.0.0.1, SQLite in .prefect/, analytics off; skipped when PREFECT_API_URL is set)
# and one process serving pipeline/<prefix>-default, watch/<prefix>-landing and retrain/<prefix>-on-new-scenes
# (prefix: params.yaml tracking.model_prefix), in the background.
# Pid files and logs: .prefect/serve/. `make stop` ends both.
PREFECT_PORT ?= 4200
serve: $(RUN_STAMP)
	$(BIN)/ms2rgb serve --detach --port $(PREFECT_PORT)

stop:
	$(BIN)/ms2rgb serve --stop

# The work-pool path to the same three deployments: prefect.yaml on the process pool WORK_POOL of the server at
# PREFECT_API_URL (pool created if missing; `prefect deploy --all`; the retrain trigger), see flows/work_pool.py.
# Then `make worker` here, or `.venv/bin/prefect worker start --pool $(WORK_POOL)` on any machine that has the
# project at this path: each flow run is a subprocess of the worker, in this folder.
# The pool prefect.yaml names (tests/test_work_pool.py keeps the two equal).
WORK_POOL := ms2rgb
deploy: $(RUN_STAMP)
	$(BIN)/ms2rgb deploy

worker: $(RUN_STAMP)
	$(BIN)/prefect worker start --pool $(WORK_POOL)

# Method A's full comparison (every variant x K in {5, 25, all} x seeds), after `make run`; see README.
compare: $(RUN_STAMP)
	$(BIN)/ms2rgb compare --grid full

bench: $(TEST_STAMP)
	$(BIN)/python bench/data_loading.py
	$(BIN)/python bench/scene.py

clean:
	rm -rf data/synth data/prepared reports mlflow.db mlartifacts .prefect
