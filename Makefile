# `make test` and `make bench` work on a fresh machine with Python 3.11 and pip: they create
# .venv, install the dependencies, build frugal._C (ninja: only what changed is rebuilt) and run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.frugal-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml

# The CUDA build of torch (runs on CPU; with nvcc it also builds the CUDA kernels) and the
# triton it pins. Tools for tests and benchmarks besides.
REQUIREMENTS := torch==2.14.1 numpy ninja pybind11 "setuptools>=64" wheel pytest \
	pytest-benchmark hypothesis matplotlib tqdm nvidia-cuda-cuobjdump

.PHONY: test bench check install clean

test: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(VENV)/bin/frugal bench

check: $(BUILT)
	$(VENV)/bin/frugal check

install: $(BUILT)

$(DEPS): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(REQUIREMENTS)
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build python/frugal/_C*.so
