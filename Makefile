# Set-up and entry points. Every target creates or reuses the virtual environment in $(VENV) and
# installs the package with the pins of constraints.txt (CPU torch 2.13.0: no multi-GB CUDA download).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: a short MSign training of a ~5M LitGPT on the shipped Shakespeare corpus, with
# stable-rank logging to CSV and TensorBoard under logs/ (see recipes/shakespeare/msign.yaml).
train: $(STAMP)
	$(VENV)/bin/lightning-msign fit --config recipes/shakespeare/msign.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
