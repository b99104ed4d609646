#!/usr/bin/env bash
# Throwaway PostgreSQL + Redis for the test suite.
# Usage: scripts/services.sh install|start|stop
# The env file ($SERVICES_ENV, default .services.env in the repo root) holds the URLs.
# RELIABLE_JOB_SERVICES_PG_OPTS (opt-in, unset for the test suite): extra postgres options, e.g.
# "-c shared_preload_libraries=pg_stat_statements" (scripts/run-bench.sh sets it).
# RELIABLE_JOB_SERVICES_DURABLE=1 (the benchmarks set it): PostgreSQL with fsync=on,
# synchronous_commit=on and full_page_writes=on, as production runs it. Unset (the test suite):
# all three off, so tests do not wait on the disk.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_FILE="${SERVICES_ENV:-$ROOT/.services.env}"
case "$ENV_FILE" in /*) ;; *) ENV_FILE="$PWD/$ENV_FILE" ;; esac
DB=reliable_job_test

log() { echo "services: $*" >&2; }

# Newest PostgreSQL bin dir (15 preferred), empty if none.
pg_bin() {
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then echo /usr/lib/postgresql/15/bin; return; fi
    local d
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    return 0
}

# Run a command as the postgres user when we are root (initdb refuses root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# True if pid is alive and not a zombie (a slow init may reap the daemon late).
running() { kill -0 "$1" 2>/dev/null && ! grep -qs '^State:.*zombie' "/proc/$1/status"; }

free_ports() {  # prints two distinct free TCP ports
    python3 -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))'
}

cmd_install() {
    local pkgs=() sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    command -v redis-server >/dev/null || pkgs+=(redis-server)
    [ -n "$(pg_bin)" ] || pkgs+=(postgresql)
    if [ ${#pkgs[@]} -gt 0 ]; then
        log "installing ${pkgs[*]}"
        $sudo apt-get update
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${pkgs[@]}"
    fi
    if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
    log "PostgreSQL in $(pg_bin), redis-server at $(command -v redis-server)"
}

cmd_start() {
    [ -f "$ENV_FILE" ] && cmd_stop   # clean slate if a previous run left something behind
    local bin redis dir pg_port redis_port
    bin="$(pg_bin)"
    redis="$(command -v redis-server)" || { log "redis-server not found (run: $0 install)"; exit 1; }
    [ -n "$bin" ] || { log "PostgreSQL not found (run: $0 install)"; exit 1; }
    dir="$(mktemp -d /tmp/reliable-job-services.XXXXXX)"
    chmod 755 "$dir"
    mkdir "$dir/pg"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir/pg"
    read -r pg_port redis_port < <(free_ports)

    # Written first, so `stop` can clean up even if starting fails half-way.
    cat > "$ENV_FILE" <<ENV
export RELIABLE_JOB_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/$DB
export RELIABLE_JOB_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/0
export RELIABLE_JOB_TEST_REDIS_SERVER=$redis
export RELIABLE_JOB_SERVICES_DIR=$dir
export RELIABLE_JOB_TEST_REQUIRE_SERVICES=1
ENV

    cd "$dir"  # the postgres user may not be able to enter the caller's cwd
    as_pg "$bin/initdb" -D "$dir/pg/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/pg/initdb.log" 2>&1 \
        || { cat "$dir/pg/initdb.log" >&2; exit 1; }
    local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    [ "${RELIABLE_JOB_SERVICES_DURABLE:-0}" = 1 ] && durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    as_pg "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 -o \
        "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1 $durability -c max_connections=200${RELIABLE_JOB_SERVICES_PG_OPTS:+ $RELIABLE_JOB_SERVICES_PG_OPTS}" \
        start >/dev/null || { tail -n 50 "$dir/pg/postgres.log" >&2; exit 1; }
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -t 30
    "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres "$DB"

    "$redis" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    local i
    for i in $(seq 100); do
        [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
        [ "$i" -eq 100 ] && { log "redis did not answer"; cat "$dir/redis.log" >&2; exit 1; }
        sleep 0.1
    done
    log "PostgreSQL on 127.0.0.1:$pg_port ($durability), Redis on 127.0.0.1:$redis_port; env in $ENV_FILE"
}

cmd_stop() {
    [ -f "$ENV_FILE" ] || return 0
    local dir bin pid i
    dir="$(sed -n 's/^export RELIABLE_JOB_SERVICES_DIR=//p' "$ENV_FILE")"
    bin="$(pg_bin)"
    if [ -n "$dir" ] && [ -d "$dir" ]; then
        cd /
        if [ -f "$dir/pg/data/postmaster.pid" ] && [ -n "$bin" ]; then
            as_pg "$bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
        fi
        if [ -f "$dir/redis.pid" ]; then
            pid="$(cat "$dir/redis.pid")"
            kill "$pid" 2>/dev/null || true
            for i in $(seq 50); do running "$pid" || break; sleep 0.1; done
            running "$pid" && kill -9 "$pid" 2>/dev/null || true
        fi
        case "$dir" in /tmp/reliable-job-services.*) rm -rf "$dir" ;; esac
    fi
    rm -f "$ENV_FILE"
    log "stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
