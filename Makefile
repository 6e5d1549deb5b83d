# `make test` and `make bench` work on a fresh machine with Python 3.11 and pip: they create
# .venv, install the dependencies, build frugal._C (ninja: only what changed is rebuilt) and run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.frugal-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml

# The CUDA build of torch (runs on CPU; with nvcc it also builds the CUDA kernels) and the
# triton it pins. Tools for tests and benchmarks besides, and transformers for
# frugal.integrations.transformers (an optional dependency of frugal itself).
REQUIREMENTS := torch==2.14.1 numpy ninja pybind11 "setuptools>=64" wheel pytest \
	pytest-benchmark hypothesis matplotlib tqdm nvidia-cuda-cuobjdump nvidia-cutlass \
	"transformers>=5,<6"

FLOOR_TRITON := $(shell sed -n 's/^FLOOR_TRITON = "\(.*\)".*/\1/p' python/frugal/check.py)
FLOOR_DIR := build/floor-triton-$(FLOOR_TRITON)

.PHONY: test bench bench-strict check check-floor gpu-check install clean sanitize

# `make sanitize`: the C++ CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer
# (setup.py, FRUGAL_SANITIZE=1; no CUDA) into build/sanitize, leaving the normal build alone, and
# the tests run against that build. An ASan error report goes to build/sanitize/log and fails it
# (its warnings, e.g. about the CUDA emulator's fiber stacks, are printed only); a
# UBSan report (the combined runtime writes it to stderr, then exits) shows in the output, as
# pytest captures only Python's sys.stderr here (--capture=sys), and fails it.
# Left out, as no C++ of ours runs in them: `frugal check` (tests/test_check.py compiles Triton
# kernels for GPUs) and the Triton interpreter tests (no slower under ASan, but 13 of the 22
# minutes that a run with them takes on a 2-core machine; and ASan flags the interpreter's own
# masked loads, triton/python/src/interpreter.cc): TRITON_INTERPRET=0 turns the 'triton'
# backends off wherever a test's id does not say triton.
SANITIZE_DIR := build/sanitize
SANITIZE_RUN := FRUGAL_SANITIZE=1 PYTHONPATH=$(SANITIZE_DIR)/lib TRITON_INTERPRET=0 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(SANITIZE_DIR)/log/asan \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/$(SANITIZE_DIR)/log/ubsan
SANITIZE_SKIP := -k "not triton" --ignore=tests/test_check.py \
	--ignore=tests/test_int8_matmul_triton.py --ignore=tests/test_paged_attention_triton.py \
	--ignore=tests/test_sparse_attention_triton.py

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

# libstdc++ is preloaded too: ASan must find the real __cxa_throw when the Triton and torch
# extensions throw C++ exceptions. detect_leaks=0: the interpreter frees nothing at exit.
sanitize: $(DEPS)
	FRUGAL_SANITIZE=1 PYTHONSAFEPATH=1 $(PY) setup.py -q build --build-base $(SANITIZE_DIR) \
		--build-lib $(SANITIZE_DIR)/lib
	rm -rf $(SANITIZE_DIR)/log && mkdir -p $(SANITIZE_DIR)/log
	$(SANITIZE_RUN) $(PY) -m pytest -q --capture=sys -p no:cacheprovider tests $(SANITIZE_SKIP); \
		status=$$?; cat $(SANITIZE_DIR)/log/* 2>/dev/null; \
		if grep -qs "ERROR: \|runtime error" $(SANITIZE_DIR)/log/*; then exit 1; fi; exit $$status

clean:
	rm -rf build python/frugal/_C*.so
