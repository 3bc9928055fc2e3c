# Two commands do everything on a fresh machine:
#   make demo   installs the dependencies, then runs GoRA vs LoRA on Rotten Tomatoes with MiniLM (CPU, < 10 min)
#   make test   installs the dependencies, then runs the whole test suite
PYTHON ?= python3
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test test-fast lint
setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m gora.bench demo

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# A contributor's loop (CONTRIBUTING.md), on an installed checkout: no set-up step
# One torch thread: on tiny models more threads only spin (10x the CPU time on a busy 2-core machine)
test-fast:  # the library's unit tests, without the harness's (test_bench_*) and the ones marked slow
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider -m "not slow" --ignore-glob='tests/unit/test_bench_*' \
		tests/unit

lint:  # ruff and mypy, configured in pyproject.toml (pip install -r requirements-ci.txt installs both)
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m mypy
