"""Staging on Django: the outbox rows written on ``connections[alias]``, in the caller's
``transaction.atomic()`` (a savepoint in a nested block), or committed at once in autocommit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from reliable_job.errors import DuplicateJobError, StagingError
from reliable_job.ports import StagedJob, as_utc
from reliable_job.schema import notify_channel, validate_table_name
from reliable_job.staging import conflicting_ids


def _utc(value: datetime | None, connection: Any) -> datetime | None:
    """``value`` (naive: UTC) as Django must be handed it for ``connection``'s column to hold the
    UTC instant, whatever ``USE_TZ`` and ``TIME_ZONE`` (the SQLAlchemy store compares UTC):

    - PostgreSQL (``timestamptz``): aware UTC. psycopg sends the offset, so neither the session's
      time zone (``TIME_ZONE`` when ``USE_TZ = False``) nor ``USE_TZ`` moves it;
    - SQLite (no offset stored; read back as UTC): the UTC wall time. With ``USE_TZ = False``
      naive; with ``USE_TZ = True`` Django stores an aware value's wall time in the connection's
      zone (``DATABASES[alias]["TIME_ZONE"]``, UTC by default), so it gets the UTC wall time
      labelled with that zone.
    """
    from django.conf import settings

    utc = as_utc(value)
    if utc is None or connection.vendor == "postgresql":
        return utc
    wall = utc.replace(tzinfo=None)
    return wall.replace(tzinfo=connection.timezone) if settings.USE_TZ else wall


class DjangoWriter:
    """Inserts staged jobs on ``connections[alias]``: in its current atomic block if there is one,
    else committed at once. With ``alias=None`` each job goes to its task's alias (``alias_for``);
    ``notify_due`` is the stager's ``NOTIFY`` throttle."""

    def __init__(
        self, alias: str | None, alias_for: Callable[[str], str], notify_due: Callable[[], bool]
    ) -> None:
        self._alias = alias
        self._alias_for = alias_for
        self._notify_due = notify_due

    def write(self, jobs: Sequence[StagedJob]) -> None:
        from django.db import DatabaseError, connections

        if not jobs:
            return
        groups: dict[str, Sequence[StagedJob]]
        if self._alias is not None or len(jobs) == 1:  # the usual call: one alias, no grouping
            groups = {self._alias or self._alias_for(jobs[0].task_name): jobs}
        else:
            by_alias: dict[str, list[StagedJob]] = {}
            for job in jobs:
                by_alias.setdefault(self._alias_for(job.task_name), []).append(job)
            groups = dict(by_alias)
        conflicts: list[str] = []
        for alias, group in groups.items():
            connection = connections[alias]
            try:
                # On PostgreSQL the relays' wake-up rides in the INSERT (see Stager.notify_due).
                notify = connection.vendor == "postgresql" and self._notify_due()
                conflicts += _insert(connection, group, notify)
            except DatabaseError as exc:
                from reliable_job.integrations.django.models import OutboxJob

                raise StagingError(
                    f"cannot write to the outbox table {OutboxJob._meta.db_table!r} of database "
                    f"{alias!r}: {' '.join(str(exc).split())} (did you run `manage.py migrate`?)"
                ) from exc
        if conflicts:
            raise DuplicateJobError(conflicts)


@dataclass(frozen=True)
class _Columns:
    """The model's columns as the staging INSERT writes them, read once from the model: every
    concrete field but the key, the constant ones (defaults, ``NULL``) prepared once."""

    table: str
    channel: str
    """The relays' ``NOTIFY`` channel (:func:`reliable_job.schema.notify_channel`)."""
    names: tuple[str, ...]
    constants: dict[str, Any]
    """Column -> its prepared value in every staged row (``state``, ``attempts``, ``NULL`` s)."""
    timestamps: dict[str, Any]
    """Column -> its model field (``created_at``, ``eta``, ``updated_at``): prepared per call, as
    ``USE_TZ`` and the connection's time zone say."""


_STAGED = ("job_id", "task_name", "queue", "message")
"""Columns taken from the :class:`~reliable_job.ports.StagedJob` as they are."""
_NOW = ("created_at", "updated_at")
"""Columns set to the staging instant (``updated_at`` also carries the NOTIFY, when due)."""


@functools.cache
def _columns() -> _Columns:
    from reliable_job.integrations.django.models import OutboxJob

    fields = [f for f in OutboxJob._meta.concrete_fields if not f.primary_key]
    constants: dict[str, Any] = {}
    timestamps: dict[str, Any] = {}
    for f in fields:
        if f.attname in _NOW or f.attname == "eta":
            timestamps[f.column] = f
        elif f.attname not in _STAGED:
            constants[f.column] = f.get_default()  # the schema's default, or None
    table = validate_table_name(OutboxJob._meta.db_table)
    return _Columns(
        table,
        notify_channel(table),
        tuple(f.column for f in fields),
        constants,
        timestamps,
    )


_SQL: dict[tuple[str, int, bool], str] = {}
"""The staging INSERT's text by (vendor, rows, notify): :func:`_insert_sql`."""


def _insert_sql(vendor: str, quote: Callable[[str], str], rows: int, notify: bool) -> str:
    """The staging INSERT's text for ``rows`` rows on a ``vendor`` connection (``quote``: its
    identifier quoting), built once per shape (calls of up to 16 jobs are kept).

    ``INSERT ... ON CONFLICT (job_id) DO NOTHING``: one row reports a conflict by its row count;
    several return the ids they inserted. With ``notify`` (PostgreSQL) the first row's
    ``updated_at`` is read through ``pg_notify(channel, '')``: the relays' wake-up rides in the
    same statement, as in the SQLAlchemy writer, instead of a round trip of its own.
    Identifiers only: the validated table name and the model's own columns; values are bound.
    """
    sql = _SQL.get((vendor, rows, notify))
    if sql is None:
        sql = _build_insert_sql(quote, rows, notify)
        if rows <= 16:
            _SQL[(vendor, rows, notify)] = sql
    return sql


def _build_insert_sql(quote: Callable[[str], str], rows: int, notify: bool) -> str:
    columns = _columns()
    placeholders = ["%s"] * len(columns.names)
    row = "(" + ", ".join(placeholders) + ")"
    first = row
    if notify:
        at = columns.names.index("updated_at")
        placeholders[at] = "(SELECT CAST(%s AS timestamp with time zone) FROM pg_notify(%s, ''))"
        first = "(" + ", ".join(placeholders) + ")"
    sql = (
        f"INSERT INTO {quote(columns.table)} ({', '.join(quote(c) for c in columns.names)}) "  # noqa: S608
        f"VALUES {', '.join([first] + [row] * (rows - 1))} "
        f"ON CONFLICT ({quote('job_id')}) DO NOTHING"
    )
    return sql if rows == 1 else f"{sql} RETURNING {quote('job_id')}"


def _insert(connection: Any, jobs: Sequence[StagedJob], notify: bool = False) -> list[str]:
    """The staging INSERT of ``jobs`` on ``connection`` (in its current atomic block, if any), one
    statement sent on Django's cursor; return the ids that were already in the outbox. A conflict
    is no database error: the caller's transaction stays usable (``bulk_create
    (ignore_conflicts=True)`` would not tell which rows it skipped).

    Values are bound; timestamps are prepared by the model's fields (time zones, each backend's
    adaptation). No model object is built: the constant columns are prepared once
    (:func:`_columns`), the text is built once per shape (:func:`_insert_sql`).
    """
    columns = _columns()
    timestamps = columns.timestamps
    now = _utc(datetime.now(timezone.utc), connection)
    prepared_now = {c: timestamps[c].get_db_prep_save(now, connection) for c in _NOW}
    eta_field = timestamps["eta"]
    channel = columns.channel
    params: list[Any] = []
    for i, j in enumerate(jobs):
        values = {
            "job_id": j.job_id if isinstance(j.job_id, str) else str(j.job_id),
            "task_name": j.task_name,
            "queue": j.queue,
            "message": j.message,
            "eta": None if j.eta is None else eta_field.get_db_prep_save(_utc(j.eta, connection), connection),
            **prepared_now,
        }
        for name in columns.names:
            params.append(values[name] if name in values else columns.constants[name])
            if notify and i == 0 and name == "updated_at":
                params.append(channel)
    sql = _insert_sql(connection.vendor, connection.ops.quote_name, len(jobs), notify)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if len(jobs) == 1:
            return [] if cursor.rowcount == 1 else [jobs[0].job_id]
        return conflicting_ids(jobs, (r[0] for r in cursor.fetchall()))
