# The two commands of the README, each in a local virtual environment made on first use:
#   make quickstart   GFA-DEEP on the embedded CIFAR-10 subset, then APGD-CE on its 500 test images
#   make test         the dialect check (ruff) and the test suite (what CI runs: make test VENV=.venv-ci)
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: quickstart test versions

# Installed again only when pyproject.toml changes (the stamp is older than it).
$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[test,crosscheck]"
	touch $@

versions: $(VENV)/.installed
	$(PYTHON) -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint) "

quickstart: $(VENV)/.installed
	$(PYTHON) train.py && $(PYTHON) eval.py --attack apgd --num_examples 500

test: versions
	$(PYTHON) -m ruff check --no-cache .
	JAX_PLATFORMS=cpu $(PYTHON) -m pytest -q -n 2 tests
