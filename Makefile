# dpkit — `make demo` (train → export → evaluate in C++ → benchmark → report) and `make test`.
# Both do every set-up step on a fresh machine: venv, pinned Python packages, apt packages,
# ONNX Runtime headers, the C++ build.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# The demo trains for a number of optimizer steps (tiny: ~5.5 min on 2 idle cores, longer on a busy machine,
# with the same policy). DEMO_TRAIN_SECONDS=N also stops training after N s: the report then warns that the
# policy is under-trained. DEMO_THREADS=N: --threads for every stage (default: dpkit.threads chooses).
DEMO_TRAIN_STEPS ?= 3000
DEMO_TRAIN_SECONDS ?=
DEMO_THREADS ?=

export PYTHONUNBUFFERED := 1

.PHONY: help setup install test test-all test-fast pytest pytest-all demo bench paper clean

help:
	@echo "make demo   - set up, train on PushT, export, evaluate with the C++ runtime, benchmark, report"
	@echo "make test   - set up, build, run the C++ tests (plain + ASan/UBSan), the consumer build and pytest"
	@echo "make test-all  - make test, plus the tests marked slow (each covered by a faster test)"
	@echo "make test-fast - the edit loop: pytest without the slow tests, stop at the first failure"
	@echo "make bench  - full latency benchmark (dpkit-bench) into benchmarks/results/"
	@echo "make paper  - the paper's PushT low-dim table on this CPU: 3 seeds of pusht_lowdim_cpu (~1.5 h on 2 cores)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Pinned packages (torch==2.13.0 CPU and the rest: requirements-lock.txt); re-run when the lock changes.
$(VENV)/.deps-stamp: requirements-lock.txt | $(PY)
	$(PIP) install -q -r requirements-lock.txt
	touch $@

setup: $(VENV)/.deps-stamp cpp-deps

# The dpkit package itself (editable) with its C++ extension; the CMake build dir persists in build/.
install: setup
	$(PIP) install -q --no-build-isolation --no-deps -e .

-include cpp/cpp.mk

# pytest in PYTEST_WORKERS processes (pytest-xdist; every test runs single-threaded, tests/conftest.py), a whole
# file per worker so each module's fixtures are built once. Tests marked slow repeat what a faster test covers
# (pyproject.toml's marker); make test skips them, make test-all runs them.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist loadfile

pytest: install
	$(VENV)/bin/pytest $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

pytest-all: install
	$(VENV)/bin/pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test: install cpp-test cpp-test-asan cpp-consumer-test pytest

test-all: install cpp-test cpp-test-asan cpp-consumer-test pytest-all

# The edit loop (not CI): no C++ suites, no tests marked slow, stop at the first failure.
test-fast: install
	$(VENV)/bin/pytest -x -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m dpkit.demo --steps $(DEMO_TRAIN_STEPS) $(if $(DEMO_TRAIN_SECONDS),--train-seconds $(DEMO_TRAIN_SECONDS)) \
		$(if $(DEMO_THREADS),--threads $(DEMO_THREADS)) --out demo_out

bench: install
	$(VENV)/bin/dpkit-bench

paper: install
	$(PY) -m dpkit.benchmarks.bench_paper_protocol

clean:
	rm -rf build demo_out .pytest_cache
