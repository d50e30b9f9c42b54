#!/usr/bin/env bash
# Builds the website-chat widget (web/widget) and installs what its build and tests need.
#
#   scripts/widget.sh build [OUT]   hafen-widget.js, hafen-widget.css and manifest.json into OUT
#                                   (default target/widget); prints their SRI hashes and sizes
#   scripts/widget.sh browser       Debian's Chromium, for the widget's browser tests
#
# Node.js and npm come from apt-get when missing (the build needs Node.js 20 or newer). The npm
# packages are installed exactly as package-lock.json pins them (`npm ci`), and only when
# node_modules is missing or older than the lock file, so a second run installs nothing.
# Install scripts stay off: esbuild and buf ship their binaries as packages of their own, and
# no package needs to run code at install time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WIDGET="$ROOT/web/widget"

log() { printf 'widget: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

ensure_node() {
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [[ "$major" -ge 20 ]] || die "Node.js 20 or newer is needed, found $(node --version)"
}

ensure_packages() {
    local stamp="$WIDGET/node_modules/.package-lock.json"
    if [[ ! -f "$stamp" || "$WIDGET/package-lock.json" -nt "$stamp" ]]; then
        log "installing the npm packages (npm ci)"
        (cd "$WIDGET" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
    fi
}

build() {
    local out="${1:-target/widget}"
    [[ "$out" = /* ]] || out="$ROOT/$out"
    ensure_node
    ensure_packages
    node "$WIDGET/build.mjs" --out "$out"
}

browser() {
    if [[ ! -x /usr/bin/chromium ]]; then
        apt_install chromium
    fi
}

case "${1:-}" in
    build) shift; build "$@" ;;
    browser) browser ;;
    *) die "usage: scripts/widget.sh build [OUT] | browser" ;;
esac
