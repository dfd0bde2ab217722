# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this project's machines; on a GPU machine an installed torch is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo
DEMO_N ?= 500
DEMO_MODELS ?= unet lvit-tw lvit-t

.PHONY: install demo test lint bench clean

$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "torch is already installed for $(PYTHON): the virtual environment will use it"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

# torch first, pinned to the local CPU build, so that no dependency's plain `torch`
# requirement pulls the CUDA wheels; `torch>=2.1` in pyproject is then already met.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medtextseg synth chest-xray --n $(DEMO_N) --out $(DEMO)/data --seed 0 --overwrite
	@for p in $(DEMO_MODELS); do \
	  $(BIN)/medtextseg train --preset $$p --tier cpu --data $(DEMO)/data --out $(DEMO)/runs/$$p --overwrite || exit 1; \
	done
	$(BIN)/medtextseg report $(addprefix $(DEMO)/runs/,$(DEMO_MODELS)) --out $(DEMO)/report

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
