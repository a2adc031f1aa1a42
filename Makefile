# Quickstart: `make run` (the demo pipeline) and `make test` (the test suite).
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 is what this project is developed on; override for a GPU build,
# e.g. `make TORCH_SPEC='torch==2.13.0' run` on a CUDA machine with the matching index.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# What the venv was installed from: pyproject.toml's content, not its mtime (a fresh clone's
# files are all new, and re-installing would re-point an existing venv's editable install)
DEPS   := $(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)

.PHONY: install run test test-quick bench clean-outputs plots

install:
	@if [ -f $(STAMP) ] && [ ! -s $(STAMP) ]; then echo "$(DEPS)" > $(STAMP); fi  # an empty stamp: made before hashes
	@if [ "$$(cat $(STAMP) 2>/dev/null)" != "$(DEPS)" ]; then \
	  test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  echo "installing arvision into $(VENV) (first time only: a few minutes)"; \
	  $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"; \
	  $(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" && echo "$(DEPS)" > $(STAMP); \
	fi

run: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/arvision run

test: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# The quick tier: every test that starts no Ray, DVC or Prefect (tests/conftest.py marks the others slow)
test-quick: $(STAMP)
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

# The CPU items of the prior benchmark (bench/results/<date>-prior-cpu/), then bench/RESULTS.md
# regenerated from every result folder. GPU runs: see bench/prior.py's docstring.
bench: install
	@PYTHONPATH=. $(BIN)/python bench/prior.py --device cpu
	@$(BIN)/python bench/report.py

# The curves and the sample grid on one page, dvc_plots/index.html, which opens offline:
# .dvc/config names a page template with Vega inlined (scripts/offline_plots_template.py).
plots:  # reads what a run wrote: never installs
	@test -x $(BIN)/dvc || { echo "no $(BIN)/dvc: make install (or make run) first"; exit 2; }
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc plots show

clean-outputs:
	rm -rf data/prepared data/tokens models metrics reports dvc.lock .arvision
