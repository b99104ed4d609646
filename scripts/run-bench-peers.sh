#!/usr/bin/env bash
# `make bench-peers`: reliable-job side by side with django-celery-outbox (the closest Python peer)
# and plain Celery, on durable PostgreSQL and Redis of their own, in one run (bench/peers/).
# The peer, reliable-job (editable) and their common dependencies go into .venv-peers (pinned by
# requirements/dev.lock where it pins them), so every system runs on the same interpreter and the
# same Django, Celery and kombu. Arguments go to `python -m bench.peers` (--quick, --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PEER="django-celery-outbox==0.4.3"
VENV=.venv-peers
PY="${PY:-python3}"
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-peers.env}"
export RELIABLE_JOB_SERVICES_DURABLE="${RELIABLE_JOB_SERVICES_DURABLE:-1}"

stamp="$VENV/.stamp-$PEER"
if [ ! -f "$stamp" ] || [ requirements/dev.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bench-peers: installing $PEER and reliable-job into $VENV" >&2
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # packaging: kombu's Redis transport imports it; the celery extra does not bring it (kombu[redis]
    # would, but pins another version than requirements/dev.lock).
    "$VENV/bin/pip" install -q -c requirements/dev.lock -e ".[celery,django,postgres]" packaging "$PEER"
    touch "$stamp"
fi

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# shellcheck disable=SC1090
. "$SERVICES_ENV"
"$VENV/bin/python" -m bench.peers "$@"
