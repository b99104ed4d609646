#!/usr/bin/env bash
# Start services, run pytest against them, always stop them. Exit status is pytest's.
#
# With no arguments (as `make test` runs it) the Django suite runs a second time on the newest
# Django release: the main .venv (python3, 3.11) resolves the lock to Django 5.2 LTS, the oldest
# supported release; Django 6.x needs Python >= 3.12, so .venv-django-newest is built from the
# same lock with such a Python (found on PATH or under pyenv, or DJANGO_NEWEST_PYTHON).
# RJ_TEST_DJANGO_NEWEST=0 skips that run, =1 forces it even with arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
# Own env file, so a developer's `make services-up` instance is left alone.
export SERVICES_ENV="${SERVICES_ENV:-$PWD/.services-test.env}"
NEWEST="${RJ_TEST_DJANGO_NEWEST:-$([ $# -eq 0 ] && echo 1 || echo 0)}"
NEWEST_VENV=.venv-django-newest

newest_python() {
    local candidates=("${DJANGO_NEWEST_PYTHON:-}" python3.12 python3.13 python3.14) p
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do candidates+=("$p"); done
    for p in "${candidates[@]}"; do
        [ -n "$p" ] || continue
        if "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            echo "$p"; return 0
        fi
    done
    return 1
}

newest_venv() {  # the venv for the newest Django, from requirements/dev.lock
    local stamp="$NEWEST_VENV/.stamp" py
    if [ -f "$stamp" ] && [ "$stamp" -nt requirements/dev.lock ] && [ "$stamp" -nt pyproject.toml ]; then
        return 0
    fi
    py="$(newest_python)" || {
        echo "run-tests: the newest Django needs Python >= 3.12: none found (set DJANGO_NEWEST_PYTHON)" >&2
        return 1
    }
    echo "run-tests: building $NEWEST_VENV with $py" >&2
    rm -rf "$NEWEST_VENV"
    "$py" -m venv "$NEWEST_VENV"
    "$NEWEST_VENV/bin/python" -m pip install -q --upgrade pip
    "$NEWEST_VENV/bin/pip" install -q -r requirements/dev.lock
    "$NEWEST_VENV/bin/pip" install -q -e . --no-deps
    touch "$stamp"
}

[ "$NEWEST" = 1 ] && newest_venv

scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# shellcheck disable=SC1090
. "$SERVICES_ENV"
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$NEWEST" = 1 ]; then
    echo "run-tests: the Django suite on Django $("$NEWEST_VENV/bin/python" -c 'import django; print(django.__version__)')" >&2
    "$NEWEST_VENV/bin/python" -m pytest tests/django -p no:cacheprovider || status=$?
fi
exit "$status"
