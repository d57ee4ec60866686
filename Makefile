# braid: the two commands of the README, and what they need.
CARGO ?= cargo

.PHONY: serve test model test-models build clippy cuda-toolchain build-cuda

# Install the default model and run braid on it.
serve: model build
	./target/release/braid serve

# Install what the tests need and run them all: Rust tests, then the OpenAI-client tests
# against a real server.
test: test-models .venv/ok
	$(CARGO) test --release
	$(CARGO) build --release
	.venv/bin/python -m pytest -q tests/python

.venv/ok:
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check openai==3.63.0 pytest==9.2.0 httpx==0.29.0 schemathesis==4.32.5 hypothesis==6.170.29 jsonschema==4.26.0
	touch $@

model:
	./scripts/install-model

# The tests also run Gemma 3 270M (Q4_K_M) against its golden data.
test-models:
	./scripts/install-model gemma3

build:
	$(CARGO) build --release

# Checks the formatting (rustfmt.toml), then lints the CPU build and the CUDA path (the latter
# without nvcc: BRAID_CUDA_CHECK_ONLY).
clippy:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	BRAID_CUDA_CHECK_ONLY=1 $(CARGO) clippy --release --features cuda --all-targets -- -D warnings

# The CUDA build, on any Linux machine (no GPU or CUDA install needed): a CUDA 13.0 toolchain
# from PyPI wheels in .cuda/ (unless NVCC or CUDA_HOME names one), then a stripped binary at
# target/braid-cuda for compute capability $(CUDA_COMPUTE_CAP) (90: H100/H200).
CUDA_COMPUTE_CAP ?= 90
cuda-toolchain:
	@if [ -z "$$NVCC$$CUDA_HOME" ]; then ./scripts/install-cuda; fi

build-cuda: cuda-toolchain
	CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) $(CARGO) build --release --features cuda --target-dir target/cuda
	strip -o target/braid-cuda target/cuda/release/braid
	@ls -l target/braid-cuda
