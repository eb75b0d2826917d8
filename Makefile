# The two commands a newcomer needs: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test lint typecheck setup clean

setup: $(STAMP)

# torch first, pinned to the CPU build: any other spec pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tinyfleet demo

# ruff, then mypy (the packages and the tests; .ci/typecheck.py), then pytest.
test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python .ci/typecheck.py

typecheck: $(STAMP)
	$(BIN)/python .ci/typecheck.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
