#!/usr/bin/env bash
# `make bench` / `make bench-quick`: start PostgreSQL and Redis as `make test` does (own env file,
# so a developer's or the test suite's instance is left alone), run the harness, always stop them.
# Arguments go to `python -m bench.harness` (--quick, --only FIGURES, --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-bench.env}"
# The bench's PostgreSQL loads pg_stat_statements: the harness counts the statements per job
# (docs/performance.md, "The database's cost per job"). The test suite's server does not.
export RELIABLE_JOB_SERVICES_PG_OPTS="${RELIABLE_JOB_SERVICES_PG_OPTS:--c shared_preload_libraries=pg_stat_statements}"

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# shellcheck disable=SC1090
. "$SERVICES_ENV"
.venv/bin/python -m bench.harness "$@"
