# make demo / make test do all of their own set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Re-install when the package metadata changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install test test-slow demo build-default eval-default proto clean help soak lint-deploy bench bench-smoke

help:
	@echo "make demo       build a demo model if missing, serve it on loopback, ask one question, shut down"
	@echo "make test       the fast test suite (what CI runs)"
	@echo "make test-slow  the tests marked slow"
	@echo "make proto      regenerate server/pb from proto/ (never edit generated files)"
	@echo "make soak       fault and soak test: 2,000 mixed requests at concurrency 32 on a real server"
	@echo "make lint-deploy  lint the Dockerfiles (hadolint) and validate the Kubernetes manifests"
	@echo "make bench      latency, export parity and serving benchmarks -> benchmarks/results/ (15-20 min idle, 2 cores)"
	@echo "make bench-smoke the same scripts in seconds on the nano model (plumbing only) -> .bench-smoke/"

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	# torch first: 2.13.0 is the local CPU build; any other version downloads a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[train,export,eval,dev,bench]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/demo.py

build-default: $(STAMP)
	$(VENV)/bin/medhallguard build-default

eval-default: $(STAMP)
	$(VENV)/bin/medhallguard eval-default --out reports/default

# Benchmarks print JSON lines and write Markdown reports; `make bench` rewrites benchmarks/results/.
BENCH_SMOKE_OUT ?= .bench-smoke
bench: $(STAMP)
	$(PY) -m benchmarks.latency
	$(PY) -m benchmarks.parity
	$(PY) -m benchmarks.serving

bench-smoke: $(STAMP)
	$(PY) -m benchmarks.latency --smoke --out $(BENCH_SMOKE_OUT)
	$(PY) -m benchmarks.parity --smoke --out $(BENCH_SMOKE_OUT)
	$(PY) -m benchmarks.serving --smoke --out $(BENCH_SMOKE_OUT)

proto: $(STAMP)
	$(PY) -m server.codegen

SOAK_REQUESTS ?= 2000
soak: $(STAMP)
	$(PY) benchmarks/soak.py --requests $(SOAK_REQUESTS) --concurrency 32 --out reports/soak/soak.json

K8S_VERSION ?= 1.33.0
lint-deploy: $(STAMP)
	$(PIP) install --quiet -e ".[deploy-lint]"
	$(VENV)/bin/hadolint deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda
	$(VENV)/bin/kubernetes-validate --strict --kubernetes-version $(K8S_VERSION) deploy/k8s/*.yaml
	$(PY) -m pytest -q tests/test_deploy.py

clean:
	rm -rf $(VENV) .pytest_cache
