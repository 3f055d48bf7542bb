# smtpguard: `make demo` runs the whole pipeline on generated traffic; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test test-fast bench install clean help

help:
	@echo "make demo   - set up, then run the pipeline end to end on generated traffic and print the alerts"
	@echo "make test   - set up (Python and Debian packages), then run the whole test suite"
	@echo "make bench  - run the benchmarks under bench/ (numbers go in docs/PERFORMANCE.md)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/smtpguard demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/bench_analyze.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
