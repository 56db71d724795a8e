# PulseCal: `make run` starts the whole stack locally, `make test` runs the test suite.
# Every install comes from the committed locks requirements*.txt (docs/dependencies.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
LOCKS := requirements-tools.txt requirements.txt requirements-dev.txt
# pip-compile with hashes, every pin (pip and setuptools too), no machine-specific index lines.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: install run test lint format bench bench-cluster clean lock upgrade lock-check config-doc

# The tools first (pip, pip-tools, the build backend), then exactly the dev lock, then the
# project and its development tools (devtools/, a distribution the image never ships) without
# touching their dependencies; pip check proves the set is complete.
$(INSTALLED): setup.cfg pyproject.toml devtools/pyproject.toml $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements-tools.txt
	$(VENV)/bin/pip-sync -q --pip-args "--no-deps --disable-pip-version-check" requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		-e . -e ./devtools
	$(PY) -m pip check -q
	touch $@

install: $(INSTALLED)

run: install
	$(PY) -m devtools.devstack

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict service worker analysis admin sidecar shared devtools

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate the locks from setup.cfg and requirements-tools.in, keeping every pin that still
# satisfies them. Order matters: runtime and dev are constrained to the pins before them.
lock: install
	$(PIP_COMPILE) -o requirements-tools.txt requirements-tools.in
	$(PIP_COMPILE) -c requirements-tools.txt -o requirements.txt setup.cfg
	$(PIP_COMPILE) --all-extras -c requirements-tools.txt -c requirements.txt \
		-o requirements-dev.txt setup.cfg requirements-tools.in

# Every package to the newest release the constraints allow, then the whole suite on it.
upgrade: LOCK_ARGS = --upgrade
upgrade: lock
	$(MAKE) test

# Offline (also part of make test): the locks agree with each other, with setup.cfg and tools.in, and with the venv.
lock-check: install
	$(PY) -m pytest -q tests/deploy/test_lock.py

# docs/configuration.md from the settings classes; tests/shared/test_config_doc.py checks it.
config-doc: install
	$(PY) -m shared.settings --markdown > docs/configuration.md

BENCH_ARGS ?=

bench/node_modules/.package-lock.json: bench/package.json bench/package-lock.json
	cd bench && npm ci --no-audit --no-fund

# Not part of CI: takes 10-15 minutes and wants a quiet machine. BENCH_ARGS=--quick for a smoke run.
bench: install bench/node_modules/.package-lock.json
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; $(PY) bench/run.py $(BENCH_ARGS)

# The service on a local 3+3 Redis Cluster against a single Redis (about 2 minutes):
# each primary's share of batches and Redis CPU, CPU per batch per shard, projected capacity.
bench-cluster: install
	$(PY) bench/cluster.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
