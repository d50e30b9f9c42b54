#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis for `make run` and `make test`.
#
#   scripts/dev-services.sh up      install what is missing (apt-get), start both, write .dev/env
#   scripts/dev-services.sh down    stop both (only the processes this script started)
#   scripts/dev-services.sh status  say what runs where
#
# PostgreSQL runs from a data directory this script creates, on 127.0.0.1 only, as the
# `postgres` user when invoked as root (PostgreSQL refuses to run as root), otherwise as the
# invoking user. Redis runs on 127.0.0.1 without persistence. No systemd is involved.
#
# Settings (environment): HAFEN_DEV_PG_PORT (55432), HAFEN_DEV_REDIS_PORT (56379),
# HAFEN_DEV_PG_FAST=1 runs PostgreSQL with fsync off, for tests only; without it PostgreSQL
# keeps its default durability (`make run`, `make bench`). A running server started in the
# other mode is restarted.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
PG_PORT="${HAFEN_DEV_PG_PORT:-55432}"
REDIS_PORT="${HAFEN_DEV_REDIS_PORT:-56379}"
REDIS_DIR="$DEV/redis"
ENV_FILE="$DEV/env"
APP_ROLE="hafen_app"
APP_DB="hafen"

log() { printf 'dev-services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- installation -------------------------------------------------------------------------

pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/pg_ctl" ]]; then
        printf '%s\n' "$dir"
    fi
}

. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

ensure_installed() {
    local missing=()
    [[ -n "$(pg_bindir)" ]] || missing+=(postgresql)
    command -v psql >/dev/null || missing+=(postgresql-client)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_install "${missing[@]}"
    fi
    [[ -n "$(pg_bindir)" ]] || die "PostgreSQL server binaries not found after installation"
}

# --- PostgreSQL ---------------------------------------------------------------------------

# Runs a command as the user that owns the cluster.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The data directory lives under .dev/ when the cluster's user can reach it there; otherwise
# (a checkout under a private home directory) in /var/tmp, linked from .dev/pg.
pg_root() {
    if [[ ! -e "$DEV/pg" ]]; then
        mkdir -p "$DEV/pg"
        if [[ $(id -u) -eq 0 ]] && ! runuser -u postgres -- test -x "$DEV" 2>/dev/null; then
            local alt
            alt="/var/tmp/hafen-dev-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)/pg"
            rmdir "$DEV/pg"
            mkdir -p "$alt"
            ln -sfn "$alt" "$DEV/pg"
            log "checkout not reachable by the postgres user: data directory in $alt"
        fi
    fi
    readlink -f "$DEV/pg"
}

pg_up() {
    local bindir root data
    bindir="$(pg_bindir)"
    root="$(pg_root)"
    data="$root/data"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres "$root"
        runuser -u postgres -- test -x "$root" \
            || die "the postgres user cannot reach $root; move the checkout or set permissions"
    fi
    if [[ ! -s "$data/PG_VERSION" ]]; then
        log "initdb in $data"
        rm -rf "$data"
        as_pg "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
            --locale=C.UTF-8 >"$root/initdb.log" 2>&1 \
            || { cat "$root/initdb.log" >&2; die "initdb failed"; }
    fi
    local mode="durable"
    [[ "${HAFEN_DEV_PG_FAST:-0}" == "1" ]] && mode="fast"
    if as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1 \
        && [[ "$(cat "$root/mode" 2>/dev/null)" != "$mode" ]]; then
        # Tests run without fsync; benchmarks and `make run` must not: restart in this mode.
        log "restarting PostgreSQL in $mode mode"
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
    if as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "PostgreSQL already running on 127.0.0.1:$PG_PORT ($mode)"
    else
        local opts="-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=''"
        opts+=" -c max_connections=300 -c shared_buffers=256MB -c max_prepared_transactions=64"
        if [[ "${HAFEN_DEV_PG_FAST:-0}" == "1" ]]; then
            opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        fi
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT ($mode)"
        as_pg "$bindir/pg_ctl" -D "$data" -l "$root/postgres.log" -o "$opts" -w -t 60 start \
            >/dev/null || { tail -n 30 "$root/postgres.log" >&2; die "PostgreSQL did not start"; }
        printf '%s\n' "$mode" >"$root/mode"
    fi
    local admin="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
    psql -q -v ON_ERROR_STOP=1 "$admin" >/dev/null <<SQL
SELECT 'CREATE ROLE $APP_ROLE LOGIN CREATEROLE NOINHERIT'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$APP_ROLE')\gexec
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_ROLE'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$APP_DB')\gexec
SQL
}

pg_down() {
    local bindir data
    bindir="$(pg_bindir)"
    [[ -n "$bindir" && -e "$DEV/pg" ]] || return 0
    data="$(readlink -f "$DEV/pg")/data"
    if [[ -d "$data" ]] && as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        log "stopping PostgreSQL"
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
}

# --- Redis --------------------------------------------------------------------------------

redis_pid() {
    local pid
    [[ -s "$REDIS_DIR/redis.pid" ]] || return 1
    pid="$(cat "$REDIS_DIR/redis.pid")"
    # Only a redis-server this script started counts (the PID may have been reused).
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server \
        && printf '%s\n' "$pid"
}

redis_up() {
    mkdir -p "$REDIS_DIR"
    if redis_pid >/dev/null; then
        log "Redis already running on 127.0.0.1:$REDIS_PORT"
        return
    fi
    log "starting Redis on 127.0.0.1:$REDIS_PORT"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --daemonize yes --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" \
        --logfile "$REDIS_DIR/redis.log" --protected-mode yes
    for _ in $(seq 1 50); do
        if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
            return
        fi
        sleep 0.1
    done
    tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
    die "Redis did not start"
}

redis_down() {
    local pid
    if pid="$(redis_pid)"; then
        log "stopping Redis"
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$REDIS_DIR/redis.pid"
}

# --- commands -----------------------------------------------------------------------------

write_env() {
    cat >"$ENV_FILE" <<EOF
HAFEN_DATABASE_URL=postgres://$APP_ROLE@127.0.0.1:$PG_PORT/$APP_DB
HAFEN_ADMIN_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
HAFEN_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/
EOF
}

case "${1:-}" in
    up)
        ensure_installed
        pg_up
        redis_up
        write_env
        log "ready; these are exported by 'make run' and 'make test' (from $ENV_FILE):"
        sed 's/^/  /' "$ENV_FILE"
        ;;
    down)
        redis_down
        pg_down
        ;;
    status)
        bindir="$(pg_bindir)"
        if [[ -n "$bindir" && -e "$DEV/pg" ]] \
            && as_pg "$bindir/pg_ctl" -D "$(readlink -f "$DEV/pg")/data" status >/dev/null 2>&1; then
            echo "postgresql: running on 127.0.0.1:$PG_PORT"
        else
            echo "postgresql: stopped"
        fi
        if redis_pid >/dev/null; then
            echo "redis: running on 127.0.0.1:$REDIS_PORT"
        else
            echo "redis: stopped"
        fi
        ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
