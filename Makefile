# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (`make lint`: ruff + mypy).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install torch==2.13.0
	# chgnet depends on torch: keep the pin on the same line so pip cannot swap the build.
	$(BIN)/pip install torch==2.13.0 -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sdl run campaigns/demo.yaml

# One process by default (what CI runs). TEST_WORKERS=2: two pytest-xdist workers, ~9 instead of ~13 min
# on a quiet 2-core machine, but two timing-sensitive campaign tests flaked that way in CI runs here. A
# test module stays on one worker, so its module fixtures (a Prefect server, a fitted model) start once;
# the modules that hold a `slow` test are handed out first (tests/conftest.py).
TEST_WORKERS ?= 0
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# ruff, mypy and the library stubs come with the `test` extra; their settings live in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
