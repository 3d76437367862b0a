# `make run` and `make test` bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/*.proto)

ENGINE_STAMP := $(VENV)/.engine
ENGINE_SRC := engine/Cargo.toml engine/Cargo.lock engine/pyproject.toml $(wildcard engine/src/*.rs) \
	$(shell find engine/vendor -type f -name '*.rs' -o -type f -name Cargo.toml 2>/dev/null)
CARGO := $(shell command -v cargo 2>/dev/null)
# Outside the checkout, so that every clone on this machine (CI's fresh ones
# too) reuses one compiled tree instead of building tokio and rustls again.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/groupcache-appliance/engine-target

.PHONY: run test unit integration lint proto proto-check bench clean engine engine-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,postgresql]'
	touch $(STAMP)

# The Rust engine (engine/), built into the venv where cargo exists; the
# build is cached in $(CARGO_TARGET_DIR) and skipped while the crate is unchanged.
# Without cargo, nothing is built and grpcio serves.
engine: $(STAMP)
ifeq ($(CARGO),)
	@echo "engine: no cargo on PATH; not built (the pure-Python path serves)"
else
	@$(MAKE) --no-print-directory $(ENGINE_STAMP)
endif

$(ENGINE_STAMP): $(ENGINE_SRC) $(STAMP)
	$(PY) -m pip install -q ./engine
	touch $(ENGINE_STAMP)

# The crate's own checks: format, lints, unit tests.
engine-check:
ifeq ($(CARGO),)
	@echo "engine-check: no cargo on PATH; skipped"
else
	cd engine && cargo fmt --check && cargo clippy --release --all-targets -- -D warnings && cargo test --release
endif

run: $(STAMP) engine
	$(VENV)/bin/appliance run

test: $(STAMP) engine proto-check lint engine-check
	$(PY) -m pytest -q -rfEs -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# Lint and format check (ruff), types (mypy); settings in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy appliance/
	$(VENV)/bin/lint-imports

# Regenerate appliance/pb from proto/ (the generated code is committed).
proto: $(STAMP)
	$(PY) -m appliance.pb.generate appliance/pb

# Fails when appliance/pb is stale against proto/.
proto-check: $(STAMP)
	$(PY) -m appliance.pb.generate --check appliance/pb

bench: $(STAMP) engine
	$(MAKE) -C bench PY=$(abspath $(PY))

clean:
	rm -rf $(VENV) build *.egg-info
