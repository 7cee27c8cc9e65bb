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

.PHONY: venv db test demo bench clean stop

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

db: venv
	@if [ -z "$$ZARKOV_TEST_MONGO_URI" ]; then scripts/dev-db start; fi

# One pytest run per server; fails if any fails or runs no test (scripts/test-servers).
test: venv
	@scripts/test-servers $(TEST_SERVERS)

demo: venv db
	$(PY) scripts/demo

# Each bench measures both bundled servers and prints their figures side by side.
bench: venv
	$(PY) bench/zmr.py
	$(PY) bench/aggregate.py
	$(PY) bench/ingest.py

stop:
	scripts/dev-db stop

clean: stop
	rm -rf var $(VENV) *.egg-info
