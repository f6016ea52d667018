# Set-up and entry points. Every target creates or reuses the virtual environment in $(VENV) and
# installs the package with the pins of constraints.txt (CPU torch 2.13.0: no multi-GB CUDA download).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline

.PHONY: setup train train-healthy test test-fast bench clean

# peft (for the adapter tests) goes in without its requirements: they are all installed by the line before, and
# resolving them again could move litgpt's pins.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "peft==0.21.*"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the same LitGPT run on the shipped Shakespeare corpus at a learning rate where its attention
# logits run away, unguarded and with the suite's recommended guard, watched by the monitors (logs under logs/),
# then `lightning-msign report` of both (reports/high-lr/report.png and .html) and a one-line verdict.
train: $(STAMP)
	$(VENV)/bin/lightning-msign fit --config recipes/shakespeare/high_lr.yaml
	$(VENV)/bin/lightning-msign fit --config recipes/shakespeare/high_lr_guarded.yaml
	$(VENV)/bin/lightning-msign report logs/csv/shakespeare-high-lr logs/csv/shakespeare-high-lr-guarded \
		--label "unguarded (LR 0.03)" --label "guarded (LR 0.03)" --out reports/high-lr \
		--title "LR 0.03: unguarded vs the recommended guard"

# A healthy-learning-rate run of a ~5M LitGPT (recipes/shakespeare/baseline.yaml; the other recipes there add
# one method each).
train-healthy: $(STAMP)
	$(VENV)/bin/lightning-msign fit --config recipes/shakespeare/baseline.yaml

# Everything (what CI runs): lint, then every test, the multi-process ones included (one 2-process launch per
# strategy, tests/jobs.py).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The edit loop: every test that starts no process (`-m "not slow"`; tests/conftest.py fails a test whose mark is
# wrong either way).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
