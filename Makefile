# Two commands a fresh machine needs (see README):
#   make up    install and start the cluster on its embedded default
#   make test  install test dependencies and run the tests
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch; GPU users keep their own torch (the package asks only torch>=2.4).
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test up test test-gpu

install:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[serve]"

install-test:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"

up: install
	llm-cluster generate "The capital of France is"

test: install-test
	$(PYTHON) -m pytest -q -m "not gpu" tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests
