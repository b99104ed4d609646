#!/usr/bin/env bash
# `make bench` / `make bench-quick`: start PostgreSQL and Redis as `make test` does (own env file,
# so a developer's or the test suite's instance is left alone), run the harness, always stop them.
# Arguments go to `python -m bench.harness` (--quick, --only FIGURES, --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-bench.env}"

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# shellcheck disable=SC1090
. "$SERVICES_ENV"
.venv/bin/python -m bench.harness "$@"
