"""Django system checks (``manage.py check``) for reliable-job: docs/operating/django-checks.md.

Configuration checks run with every ``manage.py`` command that runs checks, without touching a
database. The database checks (is the outbox table there, are reliable-job's migrations applied)
are tagged ``database``: Django runs them with ``manage.py check --database <alias>`` and in
``migrate`` (for the database it migrates), never in a plain ``manage.py check``. A missing table
is a Warning, so ``migrate`` itself is never stopped by it.

==================  ========  ===========================================================
id                  level     what
==================  ========  ===========================================================
reliable_job.E001   Error     ``RELIABLE_JOB`` is not a dict
reliable_job.E002   Error     an unknown key in ``RELIABLE_JOB`` (one message per key)
reliable_job.E003   Error     ``database_url``/``engine``/``session`` set with Django
reliable_job.E004   Error     an invalid value (one message per setting)
reliable_job.E005   Error     ``database``/``databases`` naming no ``DATABASES`` alias
reliable_job.E006   Error     the whole configuration (environment, Celery settings) invalid
reliable_job.E007   Error     the table name too long for the database's identifiers
reliable_job.E008   Error     an outbox alias on an unsupported database (not PostgreSQL/SQLite)
reliable_job.W001   Warning   ``task_always_eager``: nothing is staged
reliable_job.W002   Warning   the outbox table missing in an alias (database check)
reliable_job.W003   Warning   reliable-job migrations unapplied in an alias (database check)
==================  ========  ===========================================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register

from reliable_job import schema
from reliable_job.errors import ConfigurationError
from reliable_job.integrations.django import conf
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)

SUPPORTED_VENDORS = ("postgresql", "sqlite")
_PLAIN_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_TABLE_NAME = 51
"""``schema.validate_table_name``'s limit: the longest name whose derived identifiers
(``ix_<name>_pending``...) fit PostgreSQL's 63 characters."""
_HINT = "See docs/operating/django-checks.md."


def _error(msg: str, id: str, hint: str | None = None) -> Error:
    return Error(msg, hint=hint or _HINT, id=f"reliable_job.{id}")


def _warning(msg: str, id: str, hint: str | None = None) -> Warning:
    return Warning(msg, hint=hint or _HINT, id=f"reliable_job.{id}")


# -- configuration (no database access) -----------------------------------------------------------


def check_settings(app_configs: Sequence[Any] | None = None, **_: Any) -> list[CheckMessage]:
    """Each wrong ``RELIABLE_JOB`` entry (E001-E005, E007), then the whole configuration as staging
    reads it (E006), then the outbox aliases' databases (E008)."""
    from django.conf import settings

    raw = getattr(settings, "RELIABLE_JOB", None) or {}
    if not isinstance(raw, Mapping):
        return [_error(f"RELIABLE_JOB must be a dict, not {type(raw).__name__}", "E001")]
    messages = _check_entries(raw, settings.DATABASES)
    if messages:
        return messages
    for app in _celery_apps():
        try:
            conf.read(app=app)
        except ConfigurationError as exc:
            return [_error(f"invalid reliable-job configuration: {exc}", "E006")]
    try:
        conf.read()
    except ConfigurationError as exc:  # RELIABLE_JOB_<NAME> variables
        return [_error(f"invalid reliable-job configuration: {exc}", "E006")]
    return _check_vendors(_outbox_aliases(raw))


def _check_entries(raw: Mapping[str, Any], databases: Mapping[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    locating = set(Settings.database_location_names())
    known = set(Settings.names())
    for key, value in raw.items():
        if key in locating:
            messages.append(
                _error(
                    f"RELIABLE_JOB[{key!r}] cannot be set with Django",
                    "E003",
                    "The outbox lives in the DATABASES alias RELIABLE_JOB['database'] names.",
                )
            )
        elif key in conf.DJANGO_KEYS:
            messages.extend(_check_aliases(key, value, databases))
        elif key not in known:
            messages.append(
                _error(
                    f"RELIABLE_JOB[{key!r}] is not a reliable-job setting",
                    "E002",
                    f"Settings: {', '.join(sorted(known - locating))}, database, databases.",
                )
            )
        elif key == "table_name" and _too_long(value):
            messages.append(_table_name_too_long(value))
        else:
            try:
                Settings.load({}, code={key: value})
            except (ConfigurationError, TypeError, ValueError) as exc:
                messages.append(_error(f"RELIABLE_JOB[{key!r}] = {value!r} is invalid: {exc}", "E004"))
    return messages


def _check_aliases(key: str, value: object, databases: Mapping[str, Any]) -> list[CheckMessage]:
    aliases: Iterable[object] = [value] if key == "database" else value  # type: ignore[assignment]
    if key == "databases" and (isinstance(value, str) or not isinstance(value, Iterable)):
        aliases = [value]
    bad = [alias for alias in aliases if not isinstance(alias, str) or alias not in databases]
    return [
        _error(
            f"RELIABLE_JOB[{key!r}]: {alias!r} is not a DATABASES alias",
            "E005",
            f"DATABASES aliases: {', '.join(sorted(databases))}.",
        )
        for alias in bad
    ]


def _too_long(value: object) -> bool:
    return isinstance(value, str) and bool(_PLAIN_IDENTIFIER.match(value)) and len(value) > _MAX_TABLE_NAME


def _table_name_too_long(name: str) -> Error:
    derived = max((f"ix_{name}_{index.suffix}" for index in schema.INDEXES), key=len)
    limits = _identifier_limits()
    where = f" ({', '.join(limits)})" if limits else ""
    return _error(
        f"RELIABLE_JOB['table_name'] is {len(name)} characters long: the names made from it, such as "
        f"{derived!r} ({len(derived)} characters), exceed the database's identifier limit{where}",
        "E007",
        f"Use at most {_MAX_TABLE_NAME} characters.",
    )


def _identifier_limits() -> list[str]:
    from django.db import connections

    limits = []
    for alias in connections:
        limit = connections[alias].ops.max_name_length()
        if limit:
            limits.append(f"{alias}: {limit}")
    return limits


def _outbox_aliases(raw: Mapping[str, Any], *, discover: bool = False) -> list[str]:
    """The aliases holding an outbox: the configured ones and those registered tasks name (with
    ``discover``, the project's task modules imported first, as ``celery worker`` does)."""
    from reliable_job.integrations.django.database import DATABASE_OPTION

    found = [str(raw.get("database", conf.DEFAULT_ALIAS)), *map(str, raw.get("databases", ()))]
    for app in _celery_apps():
        if discover and not getattr(app.loader, "worker_initialized", False):
            try:
                app.loader.import_default_modules()
            except Exception:
                logger.warning("could not import the tasks of Celery app %r", app.main, exc_info=True)
        for task in list((app.tasks if discover else app._tasks).values()):
            alias = getattr(task, DATABASE_OPTION, None)
            if isinstance(alias, str):
                found.append(alias)
    return list(dict.fromkeys(found))


def _check_vendors(aliases: Iterable[str]) -> list[CheckMessage]:
    from django.db import connections

    from reliable_job.integrations.django.database import engine_url

    messages: list[CheckMessage] = []
    for alias in aliases:
        if alias not in connections:
            messages.append(_error(f"the outbox database alias {alias!r} is not in DATABASES", "E005"))
            continue
        vendor = connections[alias].vendor
        try:
            engine_url(alias)
        except ConfigurationError as exc:
            messages.append(
                _error(
                    f"{exc}",
                    "E008",
                    f"Database {alias!r} is {vendor}: the outbox needs PostgreSQL or an SQLite file.",
                )
            )
    return messages


def _celery_apps() -> list[Any]:
    """The Celery apps of this process that reliable-job installs on (Celery's Django layout)."""
    try:
        from celery import _state
    except ImportError:  # pragma: no cover - the Celery extra is not installed
        return []
    from reliable_job.integrations.django.runtime import _is_django_app

    return [
        app
        for app in list(_state._get_active_apps())
        if getattr(app, "reliable_job", None) is not None or _is_django_app(app)
    ]


def check_eager(app_configs: Sequence[Any] | None = None, **_: Any) -> list[CheckMessage]:
    """W001: ``task_always_eager`` runs tasks in the caller: nothing is staged in the outbox."""
    return [
        _warning(
            f"Celery app {app.main!r} has task_always_eager on: tasks run at once in the caller, "
            "nothing is staged in the outbox (a rollback does not undo them)",
            "W001",
            "Fine in tests that want it; turn it off wherever the outbox's guarantee matters.",
        )
        for app in _celery_apps()
        if app.conf.task_always_eager
    ]


# -- the database (only with `check --database <alias>`, and in `migrate`) ------------------------


def check_outbox_tables(
    app_configs: Sequence[Any] | None = None, databases: Sequence[str] | None = None, **_: Any
) -> list[CheckMessage]:
    """W002: the outbox table missing; W003: reliable-job migrations unapplied, in each outbox
    alias among ``databases``."""
    if not databases:
        return []
    from django.conf import settings

    raw = getattr(settings, "RELIABLE_JOB", None) or {}
    try:
        table = conf.table_name()
    except ConfigurationError:
        return []  # E004 says so
    if not isinstance(raw, Mapping):
        return []
    messages: list[CheckMessage] = []
    for alias in _outbox_aliases(raw, discover=True):
        if alias in databases:
            messages.extend(_check_alias_table(alias, table))
    return messages


def _check_alias_table(alias: str, table: str) -> list[CheckMessage]:
    from django.db import connections
    from django.db.migrations.loader import MigrationLoader

    if alias not in connections:
        return []  # E005
    connection = connections[alias]
    try:
        tables = set(connection.introspection.table_names())
        loader = MigrationLoader(connection, ignore_no_migrations=True)
    except Exception as exc:
        return [
            _warning(
                f"cannot look for the outbox table in database {alias!r}: {type(exc).__name__}",
                "W002",
            )
        ]
    applied = {name for app, name in loader.applied_migrations if app == "reliable_job"}
    unapplied = sorted(
        name for app, name in loader.graph.nodes if app == "reliable_job" and name not in applied
    )
    messages: list[CheckMessage] = []
    if table not in tables:
        messages.append(
            _warning(
                f"the outbox table {table!r} does not exist in database {alias!r}: jobs cannot be "
                "staged there, nor relayed"
                + (f" (migrations not applied: {', '.join(unapplied)})" if unapplied else ""),
                "W002",
                f"Run `manage.py migrate reliable_job --database {alias}`.",
            )
        )
    elif unapplied:
        fake = " (the table exists: --fake-initial records 0001_initial)"
        messages.append(
            _warning(
                f"reliable-job migrations not applied in database {alias!r}: {', '.join(unapplied)}",
                "W003",
                f"Run `manage.py migrate reliable_job --database {alias}`{fake}.",
            )
        )
    return messages


def register_all() -> None:
    """Register the checks (``ReliableJobConfig.ready``; registering twice is harmless)."""
    register(check_settings, "reliable_job")
    register(check_eager, "reliable_job")
    register(check_outbox_tables, "reliable_job", Tags.database)
