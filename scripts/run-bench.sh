#!/usr/bin/env bash
# `make bench` / `make bench-quick`: start PostgreSQL and Redis as `make test` does (own env file,
# so a developer's or the test suite's instance is left alone), run the harness, always stop them.
# Arguments go to `python -m bench.harness` (--quick, --only FIGURES, --out PATH), except:
#   --also-fast   after the durable run, a second run on PostgreSQL with fsync=off (as the test
#                 suite runs it), written next to the first as <out>-fast.json (doubles the time).
# PostgreSQL is durable by default (fsync=on, synchronous_commit=on, full_page_writes=on, as
# production runs it); RELIABLE_JOB_SERVICES_DURABLE=0 measures the fast settings alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-bench.env}"
# The bench's PostgreSQL loads pg_stat_statements: the harness counts the statements per job
# (docs/performance.md, "The database's cost per job"). The test suite's server does not.
export RELIABLE_JOB_SERVICES_PG_OPTS="${RELIABLE_JOB_SERVICES_PG_OPTS:--c shared_preload_libraries=pg_stat_statements}"
export RELIABLE_JOB_SERVICES_DURABLE="${RELIABLE_JOB_SERVICES_DURABLE:-1}"

also_fast=0
args=()
out=bench/results/latest.json
while [ $# -gt 0 ]; do
    case "$1" in
        --also-fast) also_fast=1 ;;
        --out) args+=("$1" "$2"); out="$2"; shift ;;
        --out=*) args+=("$1"); out="${1#--out=}" ;;
        *) args+=("$1") ;;
    esac
    shift
done

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT

run() {  # run DURABLE [extra harness arguments...]
    RELIABLE_JOB_SERVICES_DURABLE="$1" scripts/services.sh start
    shift
    # shellcheck disable=SC1090
    . "$SERVICES_ENV"
    .venv/bin/python -m bench.harness "$@"
}

run "$RELIABLE_JOB_SERVICES_DURABLE" "${args[@]+"${args[@]}"}"
if [ "$also_fast" = 1 ]; then
    # services.sh start stops the first run's services (same env file) before starting afresh.
    run 0 "${args[@]+"${args[@]}"}" --out "${out%.json}-fast.json"
fi
