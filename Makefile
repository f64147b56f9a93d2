# RadPilot's front door. `make demo` and `make test` work from a fresh clone: each creates (or
# reuses) the virtual environment in .venv and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RADPILOT_CASE_STORE ?= $(HOME)/.cache/radpilot/case-store
SRC := radpilot services tests benchmarks deploy

PROTOS := $(sort $(wildcard protos/radpilot/v1/*.proto))
PROTOC = $(PY) -m grpc_tools.protoc -I protos --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) $(PROTOS)

.PHONY: protos protos-check help venv demo test test-fast lint format bench-fmo bench-fmo-quick bench-quality bench-gpu bench-plan bench-e2e bench-phantoms bench-tightened bench-tightened-candidates bench-frontier bench-deliverable bench-convergence llm-local-check references lock image image-smoke k8s-validate kind-e2e clean

help:
	@echo "make demo       plan the TG-119 C-shape (harder protocol) and write out/demo/report.html"
	@echo "make test       run the test suite"
	@echo "make lint       ruff (lint + format check) and mypy"
	@echo "make protos     regenerate radpilot/v1 from protos/ (protos-check: buf lint + stale-stub check)"
	@echo "make bench-fmo  FMO benchmark on the 3 mm TG-119 matrix -> docs/benchmarks.md, out/bench/fmo.json"
	@echo "make bench-quality  TG-119 C-shape plan metrics next to the TG-119 institutions' mean"
	@echo "make bench-plan     agents fixed/rules/bo(/llm) on the TG-119 C-shape protocols; K=1 vs K=2 candidates"
	@echo "make bench-e2e      plan --local on the 3 mm C-shape (harder), timed end to end with its breakdown"
	@echo "make bench-phantoms TG-119 prostate/head & neck/multitarget phantoms vs the institutions' mean"
	@echo "make bench-tightened    rules and bo agents on shipped protocols with tighter organ limits"
	@echo "make bench-tightened-candidates  the same, rules agent, 3 candidates per round"
	@echo "make bench-frontier     harder C-shape at 3 mm: one FMO per objective set, then the rules agent"
	@echo "make bench-deliverable  fluence-optimal vs leaf-sequenced plans on every shipped case"
	@echo "make llm-local-check LLM_GGUF=model.gguf  the llm agent against a local llama.cpp server"
	@echo "make references     regenerate the shipped reference plans (protocols/references)"
	@echo "make image          build the container image (podman or docker); make lock repins its dependencies"
	@echo "make image-smoke    podman build from a local Debian base + orchestrator health check"
	@echo "make k8s-validate   render the kustomize overlays, strict schema validation, policy tests"
	@echo "make kind-e2e       end to end on a kind cluster (skips without docker + kind)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m services demo --out out/demo

# the suite on TEST_WORKERS processes (pytest-xdist), a test file per worker at a time (a file's
# module fixtures, such as a running set of services, are made once); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

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

# Pinned runtime dependencies for the image: a clean venv, pip install ., pip freeze.
lock:
	rm -rf out/lockvenv && $(PYTHON) -m venv out/lockvenv
	out/lockvenv/bin/pip install -q . && rm -rf build radpilot.egg-info
	{ echo "# Runtime dependencies of the RadPilot image, pinned (CPU). Regenerate with \`make lock\`"; \
	  echo "# (a clean venv, pip install ., pip freeze); the image installs these with --no-deps."; \
	  out/lockvenv/bin/pip freeze --exclude radpilot; } > deploy/requirements.lock

# The image (podman, else docker): IMAGE_TAG=dev, VARIANT=cpu|gpu, BASE_IMAGE=...
IMAGE ?= radpilot
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
, := ,
IMAGE_TAG ?= dev
VARIANT ?= cpu
ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
image:
	$(ENGINE) build -f Containerfile --build-arg VARIANT=$(VARIANT) \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE),) \
	  $(if $(wildcard $(CA_BUNDLE)),--secret id=ca$(,)src=$(CA_BUNDLE),) -t $(IMAGE):$(IMAGE_TAG) .

# Build the image with podman from a locally made Debian base and check the orchestrator's
# health from the host; skips (exit 0, with the reason) where podman is absent.
image-smoke: $(STAMP)
	$(PY) -m deploy.image_smoke

# Render every overlay, validate it strictly against Kubernetes $(K8S_VERSION), run the policy tests.
K8S_VERSION ?= 1.34.0
k8s-validate: $(STAMP)
	@for o in deploy/k8s/overlays/*/; do \
	  echo "kubectl kustomize $$o | kubernetes-validate --strict -k $(K8S_VERSION)"; \
	  $(VENV)/bin/kubectl kustomize $$o | $(VENV)/bin/kubernetes-validate --strict -k $(K8S_VERSION) --quiet - || exit 1; \
	done
	K8S_VERSION=$(K8S_VERSION) $(PY) -m pytest -q tests/deploy/test_k8s_manifests.py

# End to end on a kind cluster (needs docker and kind); skips with the reason where they are absent.
kind-e2e: $(STAMP)
	$(PY) -m deploy.kind_e2e

# TG-119 prostate, head & neck, multitarget (and paper-style) phantoms planned by the rules loop,
# next to the TG-119 institutions' mean; rewrites its section of docs/benchmarks.md.
# radpilot plan --local on the 3 mm TG-119 C-shape (harder protocol), case cached, two runs:
# wall time and where it went; rewrites its section of docs/benchmarks.md.
bench-e2e: $(STAMP)
	$(PY) -m benchmarks.bench_e2e --doc docs/benchmarks.md

bench-phantoms: $(STAMP)
	$(PY) -m benchmarks.tg119_phantoms --doc docs/benchmarks.md

bench-tightened: $(STAMP)
	$(PY) -m benchmarks.tightened --doc docs/benchmarks.md

# the same variants, rules agent, 8 rounds of 3 candidates (its own section of docs/benchmarks.md)
bench-tightened-candidates: $(STAMP)
	$(PY) -m benchmarks.tightened --candidates 3 --agents rules \
		--out out/bench/tightened-candidates.json --doc docs/benchmarks.md

bench-frontier: $(STAMP)
	$(PY) -m benchmarks.cshape_frontier --doc docs/benchmarks.md

bench-deliverable: $(STAMP)
	$(PY) -m benchmarks.bench_deliverable --doc docs/benchmarks.md

bench-convergence: $(STAMP)
	$(PY) -m benchmarks.fmo_convergence --doc docs/benchmarks.md

# The llm agent for two iterations against llama.cpp's server on a GGUF model file (built in
# .venv-llama once); skipped, with the reason, without LLM_GGUF. See docs/agents.md.
llm-local-check: $(STAMP)
	$(PY) -m benchmarks.llm_local_check --gguf "$(LLM_GGUF)"

# Regenerate the reference plans shipped in protocols/references/ (see docs/agents.md).
references: $(STAMP)
	$(PY) -m benchmarks.make_references

# On a CUDA machine without pyRadPlan: CuPy tests, then the benchmark on an analytic phantom of
# the TG-119 matrix's size (needs `pip install -e '.[gpu]'` or a CuPy already installed).
# On a CUDA machine with CuPy, numba and SciPy (no pyRadPlan, no .venv needed): the GPU tests,
# then the FMO benchmark on the analytic C-shape at 1.5 mm (2.0e8 non-zeros) -> docs/benchmarks.md
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q -rs tests/unit/fmo/test_gpu.py -p no:cacheprovider
	PYTHONPATH=. $(PYTHON) -m benchmarks.bench_fmo --case analytic-cshape --dose-grid-mm 1.5 \
		--scipy-max-seconds 60 --out out/bench/fmo-gpu.json --doc docs/benchmarks.md --doc-section bench-gpu

bench-fmo-quick: $(STAMP)
	$(PY) -m benchmarks.bench_fmo --dose-grid-mm 5 --skip-pyradplan --out out/bench/fmo-quick.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
