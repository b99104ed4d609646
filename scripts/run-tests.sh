#!/usr/bin/env bash
# Start services, run pytest against them, always stop them. Exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
# Own env file, so a developer's `make services-up` instance is left alone.
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-test.env}"

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# shellcheck disable=SC1090
. "$SERVICES_ENV"
.venv/bin/python -m pytest "$@"
