# The front door: `make demo` and `make test` set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.stamp-deps
BUILD_STAMP := $(VENV)/.stamp-build
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: demo test bench gpu-check clean

demo: $(BUILD_STAMP)
	$(PY) -m ensel demo

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

bench: $(BUILD_STAMP)
	$(PY) bench/report.py
	$(PY) bench/cpu_isa.py

# On a machine with a GPU (no network needed): builds in place with that machine's own python3 and
# torch, runs the contract suite on cuda and triton, compute-sanitizer, and the GPU report.
gpu-check:
	bash bench/gpu.sh

$(DEPS_STAMP): requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	touch $@

# The compiled module is rebuilt when csrc/ or the build files change; Python edits need nothing.
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SOURCES)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build dist $(BUILD_STAMP)
