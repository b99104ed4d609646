"""The ``RELIABLE_JOB = {...}`` Django setting, read onto the core's :class:`Settings`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.schema import DEFAULT_TABLE_NAME, validate_table_name
from reliable_job.settings import ENV_PREFIX, Settings

DEFAULT_ALIAS = "default"

DJANGO_KEYS = ("database", "databases")
"""Keys of ``RELIABLE_JOB`` that are the Django integration's own (the fields of
:class:`DjangoOptions`)."""


@dataclass(frozen=True)
class DjangoOptions:
    database: str = DEFAULT_ALIAS
    """Alias of the database jobs are staged in (and the outbox the relay reads), unless a task
    names another with ``reliable_job_database``."""
    databases: tuple[str, ...] = ()
    """Further aliases that hold an outbox (relayed and cleaned up besides ``database`` and the
    aliases tasks name)."""


def raw_settings() -> Mapping[str, Any]:
    from django.conf import settings

    value = getattr(settings, "RELIABLE_JOB", None) or {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("settings.RELIABLE_JOB must be a dict")
    return value


def read(raw: Mapping[str, Any] | None = None, *, app: Any = None) -> tuple[Settings, DjangoOptions]:
    """The core settings and the Django options.

    Precedence: ``RELIABLE_JOB``, then the Celery configuration of ``app`` when given
    (``CELERY_RELIABLE_JOB_<NAME>`` with Celery's Django layout), then ``RELIABLE_JOB_<NAME>``
    variables, then the defaults. The settings that say where the outbox is (``database_url``,
    ``engine``, ``session``) cannot be set in ``RELIABLE_JOB`` or in the Celery configuration:
    the outbox is in the alias ``database`` names.
    """
    raw = dict(raw_settings() if raw is None else raw)
    _refuse_database_location("RELIABLE_JOB", raw)
    unknown = sorted(set(raw) - set(Settings.names()) - set(DJANGO_KEYS))
    if unknown:
        raise ConfigurationError(f"RELIABLE_JOB: unknown setting(s): {', '.join(unknown)}")
    database = raw.pop("database", DEFAULT_ALIAS)
    databases = raw.pop("databases", ())
    if not isinstance(database, str) or not all(isinstance(a, str) for a in databases):
        raise ConfigurationError("RELIABLE_JOB: 'database' and 'databases' are DATABASES aliases")
    if app is None:
        settings = Settings.from_env(**raw)
    else:
        from reliable_job.integrations.celery.config import conf_key, load_settings, read_conf

        _refuse_database_location(
            "the Celery configuration", read_conf(app), lambda name: conf_key(app, name)
        )
        settings = load_settings(app, raw)
    return settings, DjangoOptions(database, tuple(databases))


def _refuse_database_location(
    where: str, names: Iterable[str], key: Callable[[str], str] = lambda name: name
) -> None:
    locating = set(Settings.database_location_names())
    misplaced = sorted(key(name) for name in names if name in locating)
    if misplaced:
        raise ConfigurationError(
            f"{where}: {', '.join(misplaced)} cannot be set with Django: the outbox lives in "
            "the database alias named by RELIABLE_JOB['database'] (a DATABASES entry)"
        )


def table_name() -> str:
    """The outbox table's name (``RELIABLE_JOB["table_name"]``, else ``RELIABLE_JOB_TABLE_NAME``,
    default ``reliable_job_outbox``), read on its own: other settings that are wrong do not stop
    the model or the migration (the system checks report them, ``checks.py``). An invalid name
    raises :class:`ConfigurationError`."""
    name = given_table_name()
    return validate_table_name(name)  # type: ignore[arg-type]  # validated: str or error


def given_table_name() -> object:
    """The table name as configured, not validated (``RELIABLE_JOB``, then the environment)."""
    from django.conf import settings

    raw = getattr(settings, "RELIABLE_JOB", None) or {}
    name = raw.get("table_name") if isinstance(raw, Mapping) else None
    if name is None:
        name = os.environ.get(f"{ENV_PREFIX}TABLE_NAME") or DEFAULT_TABLE_NAME
    return name


def model_table_name() -> str:
    """The model's table when Django starts: the configured name, or the default one when it is
    invalid, so that Django starts and ``manage.py check`` reports it (``reliable_job.E004``;
    migrating, staging and relaying refuse it)."""
    try:
        return table_name()
    except ConfigurationError:
        return DEFAULT_TABLE_NAME
