# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-nt clean mup-transfer mup-coord-check feature-learning

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tensorprograms.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/quadrature_accuracy.py

mup-transfer: $(STAMP)
	$(PY) examples/mup_transfer.py --threads 1 --seeds 2 --out out/mup_transfer_adam

# the feature-learning section of the main job alone (μP limit vs kernels, transfer)
feature-learning: $(STAMP)
	$(PY) examples/feature_learning_job.py --out out/feature_learning_job

mup-coord-check: $(STAMP)
	$(PY) examples/mup_coord_check.py --out out/coord_check

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

# our kernels next to neural-tangents' (creates .venv-nt on first use; see docs/benchmarks.md)
bench-nt: $(STAMP)
	$(PY) benchmarks/nt_compare.py --scaling 1000,2000,4000,8000
