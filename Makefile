# braid: the two commands of the README, and what they need.
CARGO ?= cargo

.PHONY: serve test model build clippy

# Install the default model and run braid on it.
serve: model build
	./target/release/braid serve

# Install what the tests need and run them all: Rust tests, then the OpenAI-client tests
# against a real server.
test: model .venv/ok
	$(CARGO) test --release
	$(CARGO) build --release
	.venv/bin/python -m pytest -q tests/python

.venv/ok:
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check openai pytest httpx
	touch $@

model:
	./scripts/install-model

build:
	$(CARGO) build --release

clippy:
	$(CARGO) clippy --release --all-targets -- -D warnings
