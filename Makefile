# slimserve: `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: serve test test-fast protos lint clean

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

## Serve the bundled digits model (or `make serve ARGS="--config deploy/config.yaml"`).
serve: $(INSTALLED)
	$(BIN)/slimserve serve $(ARGS)

## Lint, check the import layers (pyproject.toml [tool.importlinter]) and types, then run the whole test suite.
test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy server clients compression
	$(BIN)/python -m pytest $(ARGS)

## The suite without the tests that train or compress models.
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

## Rebuild the generated gRPC code from protos/*.proto.
protos: $(INSTALLED)
	$(BIN)/python -m protos.generate

lint: $(INSTALLED)
	$(BIN)/ruff check . && $(BIN)/ruff format --check server compression clients tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy server clients compression

clean:
	rm -rf $(VENV) .pytest_cache
