# The two commands of the README, each in a local virtual environment made on first use:
#   make quickstart   GFA-DEEP (paper), standard and small-beta GFA on the embedded CIFAR-10 subset,
#                     APGD-CE on its 500 test images, one table (gfa_jax/quickstart.py)
#   make test         the dialect check (ruff) and the fast tests (minutes; every commit)
#   make test-slow    the slow set: multi-process, cross-check, benchmark and long runs
#   make test-all     both (what CI runs: .ci/run)
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: quickstart test test-slow test-all versions

# Installed again only when pyproject.toml changes (the stamp is older than it). Quiet: pip's
# own warnings and errors still show, its list of what it installs does not.
$(VENV)/.installed: pyproject.toml
	@echo "Installing gfa-jax with its [test,crosscheck] extras into $(VENV) (first time: minutes)"
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -m pip install -q --upgrade pip
	@$(PYTHON) -m pip install -q -e ".[test,crosscheck]"
	@touch $@

versions: $(VENV)/.installed
	$(PYTHON) -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint) "

quickstart: $(VENV)/.installed
	$(PYTHON) -m gfa_jax.quickstart

test: versions
	$(PYTHON) -m ruff check --no-cache .
	JAX_PLATFORMS=cpu $(PYTHON) -m pytest -q -n 2 -m "not slow" tests

test-slow: versions
	JAX_PLATFORMS=cpu $(PYTHON) -m pytest -q -n 2 -m slow tests

test-all: test test-slow
