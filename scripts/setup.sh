#!/usr/bin/env bash
# Installs the tools the build and the tests need when they are missing:
# rustfmt and clippy (rustup components) and cargo-machete (from crates.io, for `make lint`),
# and — unless --toolchain-only — cargo-nextest (from crates.io), Python 3 with venv and pip
# (apt-get; the DC5 test generates a Python client from proto/ in a virtualenv, and the chart
# checks install their tools in one) and Prometheus with promtool (apt-get; the metrics test).
# PostgreSQL and Redis are installed by dev-services.sh.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# Whether python3 can create a virtualenv with pip in it. `-m venv --help` alone is not enough
# on Debian: the venv module ships with python3, but ensurepip (which puts pip into a new
# virtualenv) only with python3-venv.
python_venv_works() {
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1
}

# Pinned: a newer cargo-machete may judge differently and fail `make lint` on unchanged code.
CARGO_MACHETE_VERSION=0.9.2

command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "installing $component"
        rustup component add "$component"
    fi
done

if [[ "$(cargo machete --version 2>/dev/null)" != "$CARGO_MACHETE_VERSION" ]]; then
    log "installing cargo-machete $CARGO_MACHETE_VERSION (a minute, once)"
    cargo install --locked --version "$CARGO_MACHETE_VERSION" cargo-machete
fi

if [[ "${1:-}" != "--toolchain-only" ]]; then
    if ! cargo nextest --version >/dev/null 2>&1; then
        log "installing cargo-nextest (a few minutes, once)"
        cargo install --locked cargo-nextest
    fi
    if ! python_venv_works; then
        apt_install python3 python3-venv python3-pip
        python_venv_works || die "python3 still cannot create a virtualenv after installation"
    fi
    # The metrics test lints a scrape with promtool and has a Prometheus server of its own
    # scrape every service.
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        apt_install prometheus
    fi
fi
