# Set-up and entry points. Every target creates or reuses the virtual environment in $(VENV) and
# installs the package with the pins of constraints.txt (CPU torch 2.13.0: no multi-GB CUDA download).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline

TF5 ?= .transformers5
TF5_STAMP := $(TF5)/.installed-stamp
TF5_TESTS := tests/test_families.py tests/test_layouts_models.py tests/test_diagnostics_hf.py tests/test_forward_logits.py \
	tests/test_qk_norm.py::test_hf_llama_gets_qwen3s_qk_norm

.PHONY: setup train train-healthy test test-fast test-transformers5 docs bench clean

# peft (for the adapter tests) goes in without its requirements: they are all installed by the line before, and
# resolving them again could move litgpt's pins.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,docs]"
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

# transformers 5 apart from the venv (its huggingface_hub >= 1.31 cannot sit beside litgpt's pins): in $(TF5), put
# first on PYTHONPATH for the model-family tests only (pins: constraints-transformers5.txt).
$(TF5_STAMP): constraints-transformers5.txt $(STAMP)
	rm -rf $(TF5)
	$(PY) -m pip install --quiet --disable-pip-version-check --target $(TF5) -c constraints-transformers5.txt \
		"transformers==5.*" huggingface_hub regex tokenizers safetensors
	touch $(TF5_STAMP)

# Everything (what CI runs): lint, then every test, the multi-process ones included (one 2-process launch per
# strategy, tests/jobs.py), then the model-family tests again under transformers 5.
test: $(STAMP) $(TF5_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	PYTHONPATH=$(TF5) LIGHTNING_MSIGN_TRANSFORMERS_MAJOR=5 $(PY) -m pytest -q -p no:cacheprovider $(TF5_TESTS)

# The model-family tests under transformers 5 (the header line names the transformers imported).
test-transformers5: $(STAMP) $(TF5_STAMP)
	PYTHONPATH=$(TF5) LIGHTNING_MSIGN_TRANSFORMERS_MAJOR=5 $(PY) -m pytest -q -p no:cacheprovider $(TF5_TESTS)

# The edit loop: every test that starts no process (`-m "not slow"`; tests/conftest.py fails a test whose mark is
# wrong either way).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

# The documentation site into site/ (mkdocs-material; API pages from the docstrings; measured tables read from
# benchmarks/results/ at build time). --strict: a broken link, a missing result table or an unresolved API object
# stops it. tests/test_docs.py runs the same build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(TF5) *.egg-info .pytest_cache site
