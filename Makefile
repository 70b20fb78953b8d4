# The two commands (README): `make run` sets up .venv and starts a node on the
# embedded default; `make test` sets up .venv and runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard pyx/*.pyx pyx/*.pxd pyx/*.pxi fanout/*.pxd fanout/proto/*.proto)

.PHONY: run test build debug clean

run: $(STAMP)
	$(VENV)/bin/fanout node

test: $(STAMP)
	$(PY) -m pytest

build: $(STAMP)

# Debug build: Cython linetrace/profile hooks, bounds checks, -O0 -g,
# FANOUT_DEBUG C macro, and HTML annotation in build/cython/.
debug: $(PY)
	FANOUT_DEBUG=1 FANOUT_ANNOTATE=1 $(PY) -m pip install -q -e '.[test]'
	rm -f $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf build $(VENV) *.egg-info fanout/*.so fanout/proto/fanout_pb2.py* .pytest_cache
