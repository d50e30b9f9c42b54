# Hafen — development entry points. `make help` lists them.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
DEV_SERVICES := scripts/dev-services.sh
# Exports HAFEN_DATABASE_URL, HAFEN_ADMIN_DATABASE_URL and HAFEN_REDIS_URL from .dev/env.
LOAD_ENV := set -a && source .dev/env && set +a

.PHONY: help setup run test bench lint helm fmt clean services-up services-down services-status

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install what is missing (PostgreSQL, Redis, cargo-nextest, cargo-machete, rustfmt, clippy) and start the dev services (the widget's Node.js packages and Chromium: scripts/widget.sh)
	@scripts/setup.sh
	@$(DEV_SERVICES) up

run: setup ## Start PostgreSQL, Redis and the whole stack (`hafen dev`, TLS) in the foreground, with a demo organisation and its website
	@scripts/widget.sh build
	$(CARGO) build --bin hafen
	$(LOAD_ENV) && exec target/debug/hafen dev --demo --widget-dir target/widget

test: ## Start the dev services (fsync off; a Redis Cluster too) and run the whole test suite (the README's SDK example, the widget in Chromium and the Helm chart checks too)
	@scripts/setup.sh
	@scripts/helm.sh
	@scripts/widget.sh build
	@scripts/widget.sh browser
	@HAFEN_DEV_PG_FAST=1 $(DEV_SERVICES) up
	@$(DEV_SERVICES) cluster
	$(CARGO) build --bins
	$(CARGO) test --doc -p hafen-sdk
	$(LOAD_ENV) && $(CARGO) nextest run --workspace --no-fail-fast

bench: ## Run the benchmarks (release build, durable PostgreSQL); prints a table and JSON lines
	@scripts/setup.sh --toolchain-only
	@$(DEV_SERVICES) up
	$(CARGO) build --release --quiet --bin hafen-bench --bin hafen-messaging
	$(LOAD_ENV) && target/release/hafen-bench $(BENCH_ARGS)

lint: ## cargo fmt --check, cargo machete (unused dependencies), clippy and rustdoc with warnings denied
	@scripts/setup.sh --toolchain-only
	$(CARGO) fmt --all --check
	$(CARGO) machete
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

helm: ## Check the Helm chart and the Dockerfile: helm lint --strict, kubernetes-validate of every render for Kubernetes 1.30-1.33, checkov
	@scripts/setup.sh
	@scripts/helm.sh

fmt: ## Format the code
	$(CARGO) fmt --all

services-up: ## Start only the throwaway PostgreSQL and Redis
	@$(DEV_SERVICES) up

services-down: ## Stop the throwaway PostgreSQL, Redis and Redis Cluster
	@$(DEV_SERVICES) down

services-status: ## Say whether PostgreSQL and Redis run
	@$(DEV_SERVICES) status

clean: services-down ## Stop the dev services, delete .dev/ (databases, certificates) and target/
	rm -rf .dev
	$(CARGO) clean
