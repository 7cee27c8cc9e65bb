# make test: the whole test suite; make demo: see Zarkov work.  Both set up
# everything they need on a fresh machine: .venv/, the package and its pinned
# dependencies, and the bundled database (built with Go) unless
# ZARKOV_TEST_MONGO_URI names another server.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv db browser test fuzz demo bench screenshot clean stop

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

db: venv
	@if [ -z "$$ZARKOV_TEST_MONGO_URI" ]; then scripts/dev-db start; fi

# Debian's chromium + chromium-driver for the browser tests (installed when root).
browser:
	@scripts/browser-deps

# pytest exits 5 when it collected no test: say so loudly and fail.
test: venv db browser
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: no tests ran" >&2; fi; exit $$rc

# make fuzz: only the fuzz tests, with random inputs and ZARKOV_FUZZ_FACTOR (default
# 50) times the examples that make test runs; the time limit per test is lifted.
fuzz: venv db
	ZARKOV_FUZZ_PROFILE=fuzz $(PY) -m pytest -m fuzz -o timeout=0 $(PYTEST_ARGS)

demo: venv db
	$(PY) scripts/demo

bench: venv db
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
