# Two commands on a fresh machine:
#   make demo   # creates .venv (CPU torch from PyTorch's CPU wheel index unless .venv already has a torch), runs `trainer demo`
#   make test   # same environment, then the test suite (what CI runs)
# A GPU user keeps their own torch: put it in .venv first (python3 -m venv .venv && .venv/bin/pip install torch ...),
# or point VENV at an environment that has it (make test VENV=/path/to/env); make never replaces an installed torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,gguf,track
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint install

# gguf compiles llama.cpp (llama-cpp-python has no PyPI wheels; minutes on 2 cores; LLAVA_BUILD=OFF skips the
# multimodal library); track installs the W&B, MLflow and trackio clients. EXTRAS=dev skips both (their tests skip).
$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)" --index-url $(TORCH_INDEX)
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc)" \
	  $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(VENV)/bin/trainer demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
