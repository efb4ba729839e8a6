# gtvp: the two commands the README starts with.
#   make demo   set up this machine and run the local trusted pool (placed, tampered, moved)
#   make test   set up this machine and run every check and test
SHELL := /bin/bash
CACHE ?= $(or $(GTVP_CACHE),$(HOME)/.cache/gtvp)
VENV  ?= $(or $(GTVP_VENV),$(CACHE)/venv)
BIN   := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck down bench bench-scale images samples

setup:
	@.ci/setup-machine

# the main job: a fresh trusted pool with a gated VM and a Lazy Box placed, then the member
# running the box tampered with: quarantined, and the box live-migrated off it
demo: setup
	@$(BIN)/gtvp local down --purge >/dev/null   # a fresh pool every time
	@$(BIN)/gtvp local up
	@echo
	@$(BIN)/gtvp local tamper

down:
	@$(BIN)/gtvp local down

# the sample catalogue (crds/samples/oscomponents.yaml): build the real guest components
# from the pinned Debian packages, sign them with the demo key, rewrite the file
samples: setup
	@$(BIN)/python -m gtvp_local.guest.samples --write

# gtvp's container image (operator + agent), built here without a Docker engine: debootstrap,
# pip, umoci; cached in $(CACHE)/images by a fingerprint of its inputs (docs/images.md).
# Prints the digest, runs the image's programs (runc) and imports it when containerd runs.
images: setup
	@$(BIN)/gtvp local images

lint:
	@echo "[check] ruff (lint, format)"
	@$(BIN)/ruff check operator attestation-agent local tests
	@$(BIN)/ruff format --check operator attestation-agent local tests
	@echo "[check] import contracts (lint-imports)"
	@$(BIN)/lint-imports

typecheck:
	@echo "[check] mypy --strict"
	@$(BIN)/mypy

# the image is built (or found cached) before pytest, with progress; tests/integration/
# test_image.py then runs it from the cache (both need root: debootstrap, chroot, runc)
test: setup lint typecheck
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/gtvp local images; \
	 else echo "[test] not root: the image is not built and tests/integration/test_image.py skips"; fi
	@echo "[test] pytest (unit, integration on the real API server, e2e)"
	@$(BIN)/pytest $(PYTEST_ARGS)

bench: setup
	@echo "[bench] figures are ratios against a baseline measured in the same run"
	@$(BIN)/python -m tests.bench.bench_verify
	@$(BIN)/python -m tests.bench.bench_member_memory
	@$(BIN)/python -m tests.bench.bench_quarantine
	@$(BIN)/python -m tests.bench.bench_box_plan
	@$(BIN)/python -m tests.bench.bench_box_placement
	@$(BIN)/python -m tests.bench.bench_cli_startup
	@$(BIN)/python -m tests.bench.bench_failover --members 1000
	@$(BIN)/python -m tests.bench.bench_box_boot --runs 3
	@$(BIN)/python -m tests.bench.bench_box_migration --runs 3 --uplink-mbit 200
	@$(BIN)/python -m tests.bench.bench_box_migration --runs 3 --uplink-mbit 50
	@$(BIN)/python -m tests.bench.bench_component_fetch --runs 3 --uplink-mbit 50
	@$(BIN)/python -m tests.bench.bench_component_fetch --runs 3 --uplink-mbit 200
	@$(BIN)/python -m tests.bench.bench_balance_trace --trace all --seeds 7,1,3 --interval 10
	@$(BIN)/python -m tests.bench.bench_balance_model --seeds 1-59

# several minutes each: 1,000 and 10,000 members at a 60 s interval
bench-scale: setup
	@$(BIN)/python -m tests.bench.bench_scale --members 1000 --cycles 3
	@$(BIN)/python -m tests.bench.bench_scale --members 1000 --cycles 3 --replicas 2
	@$(BIN)/python -m tests.bench.bench_scale --members 10000 --cycles 3
