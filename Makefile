# Two commands set up a fresh machine:
#   make demo   create .venv, install Ferry (pinned by constraints.txt) and run the demo job
#   make test   create .venv if needed, install the test extras (and PostgreSQL 15 and chromium, for
#               the Prefect UI tests, from Debian's packages when missing) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade "pip>=24" "setuptools>=69" wheel

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/ferry run configs/demo.yaml

test: $(VENV)/.installed
	.ci/system-packages
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks memory-to-parquet --rows 1000000

clean:
	rm -rf ferry-output .ferry
