# RadPilot's front door. `make demo` and `make test` work from a fresh clone: each creates (or
# reuses) the virtual environment in .venv and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RADPILOT_CASE_STORE ?= $(HOME)/.cache/radpilot/case-store
SRC := radpilot services tests benchmarks

PROTOS := $(sort $(wildcard protos/radpilot/v1/*.proto))
PROTOC = $(PY) -m grpc_tools.protoc -I protos --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) $(PROTOS)

.PHONY: protos protos-check help venv demo test test-fast lint format bench-fmo bench-fmo-quick bench-quality bench-gpu bench-plan references clean

help:
	@echo "make demo       plan the TG-119 C-shape (harder protocol) and write out/demo/report.html"
	@echo "make test       run the test suite"
	@echo "make lint       ruff (lint + format check) and mypy"
	@echo "make protos     regenerate radpilot/v1 from protos/ (protos-check: buf lint + stale-stub check)"
	@echo "make bench-fmo  FMO benchmark on the 3 mm TG-119 matrix -> docs/benchmarks.md, out/bench/fmo.json"
	@echo "make bench-quality  TG-119 C-shape plan metrics next to the TG-119 institutions' mean"
	@echo "make bench-plan     agents fixed/rules/bo(/llm) on the TG-119 C-shape protocols"
	@echo "make references     regenerate the shipped reference plans (protocols/references)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m radpilot demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(SRC)
	$(VENV)/bin/ruff format $(SRC)

# Regenerate radpilot/v1 (committed) from protos/; protos-check fails when it is stale or when
# buf lint (STANDARD) finds a problem.
protos: $(STAMP)
	rm -f radpilot/v1/*_pb2*.py*
	$(call PROTOC,.)

protos-check: $(STAMP)
	cd protos && ../$(VENV)/bin/buf lint
	tmp=$$(mktemp -d) && $(call PROTOC,$$tmp) && \
	  diff -r $$tmp/radpilot/v1 radpilot/v1 -x __init__.py -x __pycache__ && rm -rf $$tmp && \
	  echo "generated stubs are current; buf lint clean"

bench-fmo: $(STAMP)
	$(PY) -m benchmarks.bench_fmo --out out/bench/fmo.json --doc docs/benchmarks.md

bench-quality: $(STAMP)
	$(PY) -m benchmarks.tg119_quality --doc docs/benchmarks.md

# Agents fixed / rules / bo (and llm when OPENAI_BASE_URL or OPENAI_API_KEY is set) on the
# TG-119 C-shape protocols; rewrites its section of docs/benchmarks.md.
bench-plan: $(STAMP)
	$(PY) -m benchmarks.bench_plan --doc docs/benchmarks.md

# Regenerate the reference plans shipped in protocols/references/ (see docs/agents.md).
references: $(STAMP)
	$(PY) -m benchmarks.make_references

# On a CUDA machine without pyRadPlan: CuPy tests, then the benchmark on an analytic phantom of
# the TG-119 matrix's size (needs `pip install -e '.[gpu]'` or a CuPy already installed).
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q tests/test_gpu.py tests/test_objectives_fmo.py -p no:cacheprovider
	PYTHONPATH=. $(PYTHON) -m benchmarks.bench_fmo --case analytic-cshape --dose-grid-mm 1.5 --out out/bench/fmo-gpu.json

bench-fmo-quick: $(STAMP)
	$(PY) -m benchmarks.bench_fmo --dose-grid-mm 5 --skip-pyradplan --out out/bench/fmo-quick.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
