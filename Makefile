# `make run` and `make test` bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/*.proto)

.PHONY: run test unit integration lint proto proto-check bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,postgresql]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/appliance run

test: $(STAMP) proto-check lint
	$(PY) -m pytest -q -rfEs -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# Lint and format check (ruff), types (mypy); settings in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy appliance/

# Regenerate appliance/pb from proto/ (the generated code is committed).
proto: $(STAMP)
	$(PY) -m appliance.pb.generate appliance/pb

# Fails when appliance/pb is stale against proto/.
proto-check: $(STAMP)
	$(PY) -m appliance.pb.generate --check appliance/pb

bench: $(STAMP)
	$(MAKE) -C bench PY=$(abspath $(PY))

clean:
	rm -rf $(VENV) build *.egg-info
