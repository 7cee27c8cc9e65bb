# make test: the whole test suite, once against each bundled server (FerretDB, then
# mongo-java-server); make demo: see Zarkov work.  Both set up everything they need on
# a fresh machine: .venv/, the package and its pinned dependencies, and the bundled
# servers (FerretDB built with Go, the java server with Maven) unless
# ZARKOV_TEST_MONGO_URI names another server.  TEST_SERVERS=java make test runs one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TEST_SERVERS ?= ferretdb java
export PYTEST_ARGS

.PHONY: venv db browser prometheus test lint fuzz demo bench screenshot clean stop

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,dev,dask]'
	touch $@

db: venv
	@if [ -z "$$ZARKOV_TEST_MONGO_URI" ]; then scripts/dev-db start; fi

# Debian's chromium + chromium-driver for the browser tests (installed when root).
browser:
	@scripts/browser-deps

# Debian's prometheus for the Prometheus test (installed when root; none left running).
prometheus:
	@scripts/prometheus-deps

# One pytest run per server; fails if any fails or runs no test (scripts/test-servers).
test: venv browser prometheus
	@scripts/test-servers $(TEST_SERVERS)

# The linter, the type checker and the layers' contract (pyproject.toml says which).
lint: venv
	$(VENV)/bin/ruff check zarkov tests bench scripts/demo scripts/zcmd scripts/zsend
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# make fuzz: only the fuzz tests, with random inputs and ZARKOV_FUZZ_FACTOR (default
# 50) times the examples that make test runs; the time limit per test is lifted.
fuzz: venv db
	ZARKOV_FUZZ_PROFILE=fuzz $(PY) -m pytest -m fuzz -o timeout=0 $(PYTEST_ARGS)

demo: venv db
	$(PY) scripts/demo

# Each bench measures both bundled servers and prints their figures side by side.
bench: venv
	$(PY) bench/cli.py
	$(PY) bench/zmr.py
	$(PY) bench/aggregate.py
	$(PY) bench/ingest.py
	$(PY) bench/web.py

# The README's picture of the dashboard, taken by the browser test over the demo's data.
screenshot: venv db browser
	ZARKOV_SCREENSHOT=docs/dashboard.png $(PY) -m pytest -q tests/test_web_browser.py -k screenshot

stop:
	scripts/dev-db stop

clean: stop
	rm -rf var $(VENV) *.egg-info
