PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=
FUZZ_EXAMPLES ?= 2000

.PHONY: venv lock lint format test fuzz bench bench-quick bench-peers services-up services-down demo clean

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements/dev.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install -r requirements/dev.lock
	$(BIN)/pip install -e . --no-deps
	touch $@

lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra celery --extra postgres \
		--extra sqlalchemy --extra django --universal --python-version 3.10 -o requirements/dev.lock

lint: venv
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

test: venv lint
	scripts/run-tests.sh $(PYTEST_ARGS)

# The state machine of tests/integration/test_state_machine.py, long and random (make test runs a
# short derandomized search): FUZZ_EXAMPLES examples per database.
fuzz: venv
	RELIABLE_JOB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) scripts/run-tests.sh tests/integration/test_state_machine.py \
		-p no:cacheprovider $(PYTEST_ARGS)

bench: venv
	scripts/run-bench.sh $(BENCH_ARGS)

bench-quick: venv
	scripts/run-bench.sh --quick $(BENCH_ARGS)

# reliable-job, django-celery-outbox (pinned) and plain Celery side by side, in .venv-peers of its
# own (bench/peers/, results in bench/results/peers.json). PEERS_ARGS=--quick for fewer rounds.
PEERS_ARGS ?=
bench-peers:
	scripts/run-bench-peers.sh $(PEERS_ARGS)

services-up:
	scripts/services.sh install
	scripts/services.sh start
	@echo "now: source .services.env && $(BIN)/python -m pytest"

services-down:
	scripts/services.sh stop

demo: venv
	$(BIN)/reliable-job demo

clean: services-down
	rm -rf $(VENV) .venv-django-newest .venv-peers build dist .pytest_cache .mypy_cache .ruff_cache .import_linter_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
