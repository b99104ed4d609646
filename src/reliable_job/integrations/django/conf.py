"""The ``RELIABLE_JOB = {...}`` Django setting, read onto the core's :class:`Settings`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.settings import Settings

DEFAULT_ALIAS = "default"

DJANGO_KEYS = ("database", "databases")
"""Keys of ``RELIABLE_JOB`` that are the Django integration's own."""
NOT_IN_DJANGO = ("database_url", "engine", "session")
"""Core settings that Django replaces with its database aliases."""


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


def read(raw: Mapping[str, Any] | None = None) -> tuple[Settings, DjangoOptions]:
    """The core settings (``RELIABLE_JOB`` wins over ``RELIABLE_JOB_*`` variables, which win over
    the defaults) and the Django options."""
    raw = dict(raw_settings() if raw is None else raw)
    core_names = {f.name for f in dataclasses.fields(Settings)}
    misplaced = sorted(set(raw) & set(NOT_IN_DJANGO))
    if misplaced:
        raise ConfigurationError(
            f"RELIABLE_JOB: {', '.join(misplaced)} cannot be set with Django: the outbox lives in "
            "the database alias named by 'database' (a DATABASES entry)"
        )
    unknown = sorted(set(raw) - core_names - set(DJANGO_KEYS))
    if unknown:
        raise ConfigurationError(f"RELIABLE_JOB: unknown setting(s): {', '.join(unknown)}")
    database = raw.pop("database", DEFAULT_ALIAS)
    databases = raw.pop("databases", ())
    if not isinstance(database, str) or not all(isinstance(a, str) for a in databases):
        raise ConfigurationError("RELIABLE_JOB: 'database' and 'databases' are DATABASES aliases")
    return Settings.from_env(**raw), DjangoOptions(database, tuple(databases))


def table_name() -> str:
    """The outbox table's name (``RELIABLE_JOB["table_name"]``, default ``reliable_job_outbox``)."""
    return read()[0].table_name
