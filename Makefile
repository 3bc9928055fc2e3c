# Two commands do everything on a fresh machine:
#   make demo   installs the dependencies, then runs GoRA vs LoRA on Rotten Tomatoes with MiniLM (CPU, < 10 min)
#   make test   installs the dependencies, then runs the whole test suite
PYTHON ?= python3
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test
setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m gora.bench demo

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
