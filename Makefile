# Set-up and the two everyday commands. Everything installs into .venv from scratch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is served from local disk on the dev machines and from PyPI elsewhere (CUDA build on Linux).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fsl-cache demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	# one BLAS thread: deterministic float sums and no oversubscription with loader/subprocess workers
	OMP_NUM_THREADS=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) cache demo_data
