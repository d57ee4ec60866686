# braid: the two commands of the README, and what they need.
CARGO ?= cargo

.PHONY: serve test model build clippy

# Install the default model and run braid on it.
serve: model build
	./target/release/braid generate --chat --prompt "Write a haiku about sharing one GPU with many friends." --max-tokens 64

# Install what the tests need and run them all.
test: model
	$(CARGO) test --release

model:
	./scripts/install-model

build:
	$(CARGO) build --release

clippy:
	$(CARGO) clippy --release --all-targets -- -D warnings
