#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis for `make run` and `make test`.
#
#   scripts/dev-services.sh up       install what is missing (apt-get), start both, write .dev/env
#   scripts/dev-services.sh cluster  also start a Redis Cluster: three masters, three replicas
#   scripts/dev-services.sh down     stop everything (only the processes this script started)
#   scripts/dev-services.sh status   say what runs where
#
# PostgreSQL runs from a data directory this script creates, on 127.0.0.1 only, as the
# `postgres` user when invoked as root (PostgreSQL refuses to run as root), otherwise as the
# invoking user. Redis runs on 127.0.0.1 without persistence. No systemd is involved.
#
# Both speak only TLS (OC4, TM5), with certificates from the development CA in .dev/certs,
# which this script creates with openssl when it lacks them: the CA, one certificate per
# Hafen service (SAN hafen-<service>, its identity for internal calls) and one each for
# PostgreSQL and Redis. The CA's private key lives only in a temporary directory while the
# certificates are signed, so nothing can sign further ones. PostgreSQL refuses plaintext
# connections (pg_hba has only hostssl lines); Redis has no plaintext port. The URLs in
# .dev/env ask for verify-full and rediss://.
#
# The Redis Cluster's nodes listen (TLS only) on HAFEN_DEV_REDIS_CLUSTER_PORT (57001) and the
# five ports after it, their cluster bus (TLS too) 1000 ports higher; each node keeps its
# cluster state (nodes.conf, no data) in .dev/redis-cluster/<port>. `cluster` starts the nodes
# that are not running, so a node that was stopped (a failover test kills one) comes back and
# rejoins, as a replica of the master that took over. .dev/env names three of them as
# HAFEN_DEV_CLUSTER_URLS, for --redis-url with --redis-cluster.
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
CLUSTER_PORT="${HAFEN_DEV_REDIS_CLUSTER_PORT:-57001}"
CLUSTER_DIR="$DEV/redis-cluster"
CERTS="$DEV/certs"
ENV_FILE="$DEV/env"
# The services that get a certificate of their own; keep in step with
# hafen_platform::tls::SERVICES (a test compares them).
SERVICES=(auth messaging tenant retention audit webchat)
APP_ROLE="hafen_app"
APP_DB="hafen"
# The key store (wrapped keys, deletion log): a database of its own, as in production.
KEYS_DB="hafen_keys"

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
    command -v openssl >/dev/null || missing+=(openssl)
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_install "${missing[@]}"
    fi
    [[ -n "$(pg_bindir)" ]] || die "PostgreSQL server binaries not found after installation"
}

# --- certificates -------------------------------------------------------------------------

certs_complete() {
    [[ -s "$CERTS/ca.pem" && -s "$CERTS/postgres.pem" && -s "$CERTS/redis-key.pem" ]] || return 1
    local name
    for name in "${SERVICES[@]}"; do
        [[ -s "$CERTS/$name.pem" && -s "$CERTS/$name-key.pem" ]] || return 1
    done
}

# issue NAME OUT WORK: a key and a certificate for NAME in OUT, signed by the CA whose key is
# in WORK, valid for localhost, 127.0.0.1, ::1 and hafen-NAME, for server and client use.
issue() {
    local name="$1" out="$2" work="$3"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/$name-key.pem" 2>/dev/null
    chmod 600 "$out/$name-key.pem"
    openssl req -new -key "$out/$name-key.pem" -subj "/CN=hafen-$name" -out "$work/$name.csr" 2>/dev/null
    cat >"$work/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, DNS:hafen-$name, IP:127.0.0.1, IP:::1
authorityKeyIdentifier = keyid
EOF
    openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.pem" -CAkey "$work/ca-key.pem" \
        -CAserial "$work/ca.srl" -CAcreateserial -days 365 -sha256 -extfile "$work/$name.ext" -out "$out/$name.pem" 2>/dev/null
}

ensure_certs() {
    certs_complete && return 0
    local work staging name
    work="$(mktemp -d)"
    staging="$DEV/.certs-staging-$$"
    # The CA key never outlives this function, also when a step fails.
    trap 'rm -rf "$work" "$staging"' EXIT
    rm -rf "$staging"
    mkdir -p "$staging"
    log "creating the development CA and certificates in $CERTS"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca-key.pem" 2>/dev/null
    openssl req -x509 -new -key "$work/ca-key.pem" -days 365 -sha256 \
        -subj "/O=Hafen development/CN=Hafen development CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$staging/ca.pem" 2>/dev/null
    for name in "${SERVICES[@]}" postgres redis; do
        issue "$name" "$staging" "$work"
    done
    rm -rf "$work"
    # Certificates of an earlier CA (e.g. generated by `hafen dev` alone) would not match.
    rm -rf "$CERTS"
    mv "$staging" "$CERTS"
    trap - EXIT
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
    # PostgreSQL reads its key only when the cluster's user owns it with mode 0600.
    install -m 600 "$CERTS/postgres-key.pem" "$root/server-key.pem"
    install -m 644 "$CERTS/postgres.pem" "$root/server.pem"
    cat >"$root/pg_hba.conf" <<EOF
# Only TLS: a plaintext connection finds no line and is refused.
hostssl all all 127.0.0.1/32 trust
hostssl all all ::1/128 trust
EOF
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres "$root/server-key.pem" "$root/server.pem" "$root/pg_hba.conf"
    fi
    # The mode names the durability and the certificate, so either change restarts.
    local mode="durable"
    [[ "${HAFEN_DEV_PG_FAST:-0}" == "1" ]] && mode="fast"
    mode+=" tls $(sha256sum "$root/server.pem" | cut -c1-12)"
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
        opts+=" -c ssl=on -c ssl_cert_file=$root/server.pem -c ssl_key_file=$root/server-key.pem"
        opts+=" -c ssl_min_protocol_version=TLSv1.2 -c hba_file=$root/pg_hba.conf"
        opts+=" -c max_connections=300 -c shared_buffers=256MB -c max_prepared_transactions=64"
        if [[ "${HAFEN_DEV_PG_FAST:-0}" == "1" ]]; then
            opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        fi
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT ($mode)"
        as_pg "$bindir/pg_ctl" -D "$data" -l "$root/postgres.log" -o "$opts" -w -t 60 start \
            >/dev/null || { tail -n 30 "$root/postgres.log" >&2; die "PostgreSQL did not start"; }
        printf '%s\n' "$mode" >"$root/mode"
    fi
    local admin="postgresql://postgres@127.0.0.1:$PG_PORT/postgres?$(pg_tls_params)"
    psql -q -v ON_ERROR_STOP=1 "$admin" >/dev/null <<SQL
SELECT 'CREATE ROLE $APP_ROLE LOGIN CREATEROLE NOINHERIT'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$APP_ROLE')\gexec
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_ROLE'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$APP_DB')\gexec
SELECT 'CREATE DATABASE $KEYS_DB OWNER $APP_ROLE'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$KEYS_DB')\gexec
SQL
}

pg_tls_params() {
    printf 'sslmode=verify-full&sslrootcert=%s' "$CERTS/ca.pem"
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
    log "starting Redis on 127.0.0.1:$REDIS_PORT (TLS only)"
    redis-server --bind 127.0.0.1 --port 0 --tls-port "$REDIS_PORT" \
        --tls-cert-file "$CERTS/redis.pem" --tls-key-file "$CERTS/redis-key.pem" \
        --tls-ca-cert-file "$CERTS/ca.pem" --tls-auth-clients no \
        --save '' --appendonly no \
        --daemonize yes --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" \
        --logfile "$REDIS_DIR/redis.log" --protected-mode yes
    for _ in $(seq 1 50); do
        if redis-cli --tls --cacert "$CERTS/ca.pem" -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null \
            | grep -q PONG; then
            return
        fi
        sleep 0.1
    done
    tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
    die "Redis did not start"
}

# Stops a process this script started and waits (5 s at most) until it is gone.
stop_pid() {
    local pid="$1" _
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
}

redis_down() {
    local pid
    if pid="$(redis_pid)"; then
        log "stopping Redis"
        stop_pid "$pid"
    fi
    rm -f "$REDIS_DIR/redis.pid"
}

# --- Redis Cluster ------------------------------------------------------------------------

cluster_ports() {
    local i
    for i in 0 1 2 3 4 5; do
        printf '%s\n' "$((CLUSTER_PORT + i))"
    done
}

node_cli() {
    local port="$1"
    shift
    redis-cli --tls --cacert "$CERTS/ca.pem" -h 127.0.0.1 -p "$port" "$@"
}

node_pid() {
    local dir="$CLUSTER_DIR/$1" pid
    [[ -s "$dir/redis.pid" ]] || return 1
    pid="$(cat "$dir/redis.pid")"
    # Only this node's redis-server counts (its title names its port; PIDs are reused).
    [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "redis-server.*:$1" \
        && printf '%s\n' "$pid"
}

node_up() {
    local port="$1" dir="$CLUSTER_DIR/$1"
    mkdir -p "$dir"
    node_pid "$port" >/dev/null && return 0
    redis-server --bind 127.0.0.1 --port 0 --tls-port "$port" \
        --tls-cert-file "$CERTS/redis.pem" --tls-key-file "$CERTS/redis-key.pem" \
        --tls-ca-cert-file "$CERTS/ca.pem" --tls-auth-clients no \
        --tls-cluster yes --tls-replication yes \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$((port + 1000))" \
        --cluster-node-timeout 2000 --cluster-replica-validity-factor 0 \
        --save '' --appendonly no \
        --daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" \
        --logfile "$dir/redis.log" --protected-mode yes
    local _
    for _ in $(seq 1 50); do
        node_cli "$port" ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.1
    done
    tail -n 20 "$dir/redis.log" >&2 || true
    die "Redis Cluster node $port did not start"
}

cluster_up() {
    local port ports=()
    mapfile -t ports < <(cluster_ports)
    log "starting the Redis Cluster on 127.0.0.1:${ports[0]}-${ports[5]} (TLS only)"
    for port in "${ports[@]}"; do
        node_up "$port"
    done
    if node_cli "${ports[0]}" cluster info | grep -q '^cluster_slots_assigned:0'; then
        local nodes=()
        for port in "${ports[@]}"; do
            nodes+=("127.0.0.1:$port")
        done
        node_cli "${ports[0]}" --cluster create "${nodes[@]}" --cluster-replicas 1 \
            --cluster-yes >"$CLUSTER_DIR/create.log" 2>&1 \
            || { cat "$CLUSTER_DIR/create.log" >&2; die "redis-cli --cluster create failed"; }
    fi
    # Ready: every node sees the cluster as ok, and three replicas follow their masters (so a
    # master can fail over).
    local ok replicas deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        ok=1
        replicas=0
        for port in "${ports[@]}"; do
            node_cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ok=0
            if node_cli "$port" info replication 2>/dev/null | grep -q '^master_link_status:up'; then
                replicas=$((replicas + 1))
            fi
        done
        [[ $ok -eq 1 && $replicas -eq 3 ]] && return 0
        sleep 0.1
    done
    die "the Redis Cluster did not reach cluster_state:ok with three replicas within 30 s"
}

cluster_down() {
    local port pid
    for port in $(cluster_ports); do
        if pid="$(node_pid "$port")"; then
            stop_pid "$pid"
        fi
        rm -f "$CLUSTER_DIR/$port/redis.pid"
    done
}

# --- commands -----------------------------------------------------------------------------

write_env() {
    cat >"$ENV_FILE" <<EOF
HAFEN_DATABASE_URL='postgres://$APP_ROLE@127.0.0.1:$PG_PORT/$APP_DB?$(pg_tls_params)'
HAFEN_KEYSTORE_URL='postgres://$APP_ROLE@127.0.0.1:$PG_PORT/$KEYS_DB?$(pg_tls_params)'
HAFEN_ADMIN_DATABASE_URL='postgres://postgres@127.0.0.1:$PG_PORT/postgres?$(pg_tls_params)'
HAFEN_REDIS_URL=rediss://127.0.0.1:$REDIS_PORT/
HAFEN_REDIS_CA=$CERTS/ca.pem
EOF
    if node_pid "$CLUSTER_PORT" >/dev/null; then
        write_cluster_env
    fi
}

# Names the Redis Cluster in .dev/env, leaving the other lines as they are (a test that
# starts a node again must not rewrite them).
write_cluster_env() {
    local kept=""
    [[ -f "$ENV_FILE" ]] && kept="$(grep -v '^HAFEN_DEV_CLUSTER_URLS=' "$ENV_FILE" || true)"
    {
        [[ -n "$kept" ]] && printf '%s\n' "$kept"
        printf 'HAFEN_DEV_CLUSTER_URLS=rediss://127.0.0.1:%s/,rediss://127.0.0.1:%s/,rediss://127.0.0.1:%s/\n' \
            "$CLUSTER_PORT" "$((CLUSTER_PORT + 1))" "$((CLUSTER_PORT + 2))"
    } >"$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
}

case "${1:-}" in
    up)
        ensure_installed
        ensure_certs
        pg_up
        redis_up
        write_env
        log "ready; these are exported by 'make run' and 'make test' (from $ENV_FILE):"
        sed 's/^/  /' "$ENV_FILE"
        ;;
    cluster)
        ensure_installed
        ensure_certs
        cluster_up
        write_cluster_env
        log "Redis Cluster ready; HAFEN_DEV_CLUSTER_URLS in $ENV_FILE names it"
        ;;
    down)
        cluster_down
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
        for port in $(cluster_ports); do
            if node_pid "$port" >/dev/null; then
                echo "redis cluster node: running on 127.0.0.1:$port"
            fi
        done
        ;;
    *)
        echo "usage: $0 up|cluster|down|status" >&2
        exit 2
        ;;
esac
