# One-command entry points. Each creates (or reuses) the local virtual environment .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: on CPU-only machines the 2.13.0 CPU wheel is found locally
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmcraft pipeline recipes/demo.yaml

# Three pytest runs: fast unit tests, parity tests (one process pays for importing transformers/peft),
# then slow integration tests on real assets. Exit code 5 ("no tests collected") is not a failure.
PYTEST := $(BIN)/python -m pytest -q
define run_marked
	$(PYTEST) -m $(1) || [ $$? -eq 5 ]
endef

test: $(STAMP)
	$(call run_marked,"not slow and not parity")
	$(call run_marked,"parity and not slow")
	$(call run_marked,"slow")

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not parity"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info
