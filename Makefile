# Fresh machine: `make quickstart` (set up + train the quickstart job) or `make test` (set up + whole suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the pinned CPU wheel (an unpinned torch pulls GBs of CUDA wheels).
# GPU machines: `make setup TORCH_SPEC=` keeps the torch you installed yourself.
TORCH_SPEC ?= torch==2.13.0
# CPU-only machines pin DeepSpeed to its CPU accelerator; on a GPU box it must not leak into GPU runs.
ifeq ($(wildcard /dev/nvidiactl),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: setup quickstart test test-fast lint bench clean

$(BIN)/raybig: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]" $(if $(TORCH_SPEC),"$(TORCH_SPEC)",)
	touch $@

setup: $(BIN)/raybig

quickstart: setup
	$(BIN)/raybig run jobs/quickstart.yaml

test: setup
	bash scripts/system-deps.sh
	$(BIN)/pytest -q -rs --durations=60 tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-fast: setup
	$(BIN)/pytest -q -m "unit" tests

# ruff (with pydocstyle rules), the type checker, and the import-layer contract of pyproject.toml.
lint: setup
	$(BIN)/ruff check raybig tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
