# One command to set up and run: `make run` (the pipeline) and `make test` (the suite). Both create .venv.
# CONSTRAINTS pins torch==2.13.0 (a local CPU wheel on our build machines; an unpinned torch pulls a multi-GB
# CUDA build). GPU users: `make test CONSTRAINTS=/dev/null` keeps pyproject.toml's torch range.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.v3kit-installed
KERNEL := v3kit

.PHONY: setup test test-fast run lab notebooks clean bench bench-quick

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e '.[notebooks,dev,text]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (v3kit)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# Lint and formatting first (ruff, configured in pyproject.toml; `ruff format .` fixes the formatting), then the suite.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The inner loop: lint, then every test not marked slow (no notebooks, browser, crash, Ray or tracker runs); under
# 90 s on 2 cores. CI runs `make test`, the full suite.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

run: setup
	$(BIN)/v3kit run $(ARGS)

# JupyterLab refuses to start as root without --allow-root (containers, CI boxes): add it only there.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: notebooks
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

# The notebooks' sources are notebooks/NN_name.py (jupytext py:percent); the .ipynb beside them are generated and
# git-ignored. `make notebooks` creates missing .ipynb and syncs whichever side changed last into the other, so
# edits saved in JupyterLab (with or without the jupytext extension) land in the .py; outputs never do.
notebooks: setup
	$(BIN)/jupytext --sync notebooks/[0-9][0-9]_*.py

# Performance table (benchmarks/bench.py): prints one table, writes benchmarks/results.json. bench-quick: < 3 min.
bench: setup
	$(BIN)/python benchmarks/bench.py

bench-quick: setup
	$(BIN)/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
