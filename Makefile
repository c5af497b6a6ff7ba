# Two commands for a fresh machine (Python 3.11, pip reaching PyPI):
#   make demo   set up .venv and train the bundled tiny FLUX with Dynamic-TreeRPO (CPU)
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench
setup: $(VENV)/.installed

# torch first: the pinned 2.13.0 is a small CPU build; an unpinned torch would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/treerpo demo

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/treerpo bench nfe
	$(BIN)/treerpo bench speed
