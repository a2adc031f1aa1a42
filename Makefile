# Quickstart: `make run` (the demo pipeline) and `make test` (the test suite).
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 is what this project is developed on; override for a GPU build,
# e.g. `make TORCH_SPEC='torch==2.13.0' run` on a CUDA machine with the matching index.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install run test test-quick bench clean-outputs plots

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing arvision into $(VENV) (first time only: a few minutes)"
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	@$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/arvision run

test: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# The quick tier: every test that starts no Ray, DVC or Prefect (tests/conftest.py marks the others slow)
test-quick: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

# The CPU items of the prior benchmark (bench/results/<date>-prior-cpu/), then bench/RESULTS.md
# regenerated from every result folder. GPU runs: see bench/prior.py's docstring.
bench: $(STAMP)
	@PYTHONPATH=. $(BIN)/python bench/prior.py --device cpu
	@$(BIN)/python bench/report.py

# The curves and the sample grid on one page, dvc_plots/index.html, which opens offline:
# .dvc/config names a page template with Vega inlined (scripts/offline_plots_template.py).
plots: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc plots show

clean-outputs:
	rm -rf data/prepared data/tokens models metrics reports dvc.lock .arvision
