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
	pytest-benchmark hypothesis matplotlib tqdm nvidia-cuda-cuobjdump nvidia-cutlass

FLOOR_TRITON := $(shell sed -n 's/^FLOOR_TRITON = "\(.*\)".*/\1/p' python/frugal/check.py)
FLOOR_DIR := build/floor-triton-$(FLOOR_TRITON)

.PHONY: test bench bench-strict check check-floor gpu-check install clean

test: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(VENV)/bin/frugal bench

bench-strict: $(BUILT)
	$(VENV)/bin/frugal bench --strict

check: $(BUILT)
	$(VENV)/bin/frugal check

# The launches of `frugal check`, compiled by the oldest Triton frugal supports (installed apart
# from the venv's own, in build/).
check-floor: $(BUILT) $(FLOOR_DIR)/.installed
	$(VENV)/bin/frugal check --floor --floor-path $(FLOOR_DIR)

$(FLOOR_DIR)/.installed:
	$(PY) -m pip install -q --no-deps --target $(FLOOR_DIR) triton==$(FLOOR_TRITON)
	touch $@

# On a machine with a GPU: the whole suite on CUDA tensors and a short GPU bench; JSON and
# Markdown in gpu-check-results/. Without a GPU it says so and exits 0.
gpu-check: $(BUILT)
	$(VENV)/bin/frugal gpu-check

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
