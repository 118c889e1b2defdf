# Everyday targets. `make run` and `make test` are the two commands a newcomer needs (README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
BUNDLE ?= bundles/default
PORT ?= 50051
METRICS_PORT ?= 9090

.PHONY: run setup bundle serve test lint typecheck bench clean prometheus postgresql container-tools

run: setup $(BUNDLE)/manifest.json  ## set up, build the default bundle if missing, serve it
	@echo "Serving $(BUNDLE) on :$(PORT) (metrics on :$(METRICS_PORT)). In another shell, try:"
	@echo "  $(BIN)/router route 'What is the boiling point of water at 2 atm?'"
	@echo "  $(BIN)/router route 'Prove that sqrt(2) is irrational.' --cost-weight 0"
	@echo "  grpcurl -plaintext -d '{\"prompt\": \"hi\"}' localhost:$(PORT) router.v1.Router/Route"
	$(BIN)/router serve --bundle $(BUNDLE) --port $(PORT) --metrics-port $(METRICS_PORT)

setup: $(VENV)/.installed

# torch is pinned so that pip takes the CPU wheel (a plain `torch` pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard proto/router/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[cpu,train,dev]'
	touch $@

bundle: $(BUNDLE)/manifest.json

$(BUNDLE)/manifest.json: | setup
	$(BIN)/router train --data $(DATA)/mmlu_pro --out $(BUNDLE)

serve: setup
	$(BIN)/router serve --bundle $(BUNDLE) --port $(PORT) --metrics-port $(METRICS_PORT)

# The ops tests run a real Prometheus; install Debian's package when it is missing.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# The feedback tests run a real PostgreSQL server.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The container tests build and run the real image with podman (docs/OPERATIONS.md).
container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null; }

test: setup prometheus postgresql container-tools lint typecheck  ## lint, format and type checks, then the whole suite
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy router training

# A benchmark, not a test: serves $(BUNDLE) on spare ports and measures it (docs/BENCHMARKS.md).
# BENCH_ARGS passes more options, e.g. BENCH_ARGS="--soak 100000 --json reports/bench.json".
BENCH_DATA ?= $(DATA)/mmlu_pro
BENCH_ARGS ?=
bench: $(BUNDLE)/manifest.json
	@$(BIN)/router serve --bundle $(BUNDLE) --host 127.0.0.1 --port 50071 --metrics-port 9171 \
	  --bundle-poll-s 0 & server=$$!; trap "kill $$server" EXIT; \
	$(BIN)/router bench --server 127.0.0.1:50071 --metrics-url http://127.0.0.1:9171/metrics \
	  --bundle $(BUNDLE) --data $(BENCH_DATA) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info router/v1/*_pb2*.py router/v1/*_pb2*.pyi
