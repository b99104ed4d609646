"""The ``RELIABLE_JOB = {...}`` Django setting, read onto the core's :class:`Settings`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.settings import Settings

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
    """The outbox table's name (``RELIABLE_JOB["table_name"]``, default ``reliable_job_outbox``)."""
    return read()[0].table_name
