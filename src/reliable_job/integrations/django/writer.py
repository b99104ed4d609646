"""Staging on Django: the outbox rows written on ``connections[alias]``, in the caller's
``transaction.atomic()`` (a savepoint in a nested block), or committed at once in autocommit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

        from reliable_job.integrations.django.models import OutboxJob

        groups: dict[str, list[StagedJob]] = {}
        for job in jobs:
            alias = self._alias or self._alias_for(job.task_name)
            groups.setdefault(alias, []).append(job)
        conflicts: list[str] = []
        for alias, group in groups.items():
            connection = connections[alias]
            try:
                conflicts += _insert(connection, group)
                if connection.vendor == "postgresql" and self._notify_due():
                    # Wakes the relays when this transaction commits (see Stager.notify_due).
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_notify(%s, '')", [notify_channel(OutboxJob._meta.db_table)])
            except DatabaseError as exc:
                raise StagingError(
                    f"cannot write to the outbox table {OutboxJob._meta.db_table!r} of database "
                    f"{alias!r}: {' '.join(str(exc).split())} (did you run `manage.py migrate`?)"
                ) from exc
        if conflicts:
            raise DuplicateJobError(conflicts)


def _insert(connection: Any, jobs: Sequence[StagedJob]) -> list[str]:
    """``INSERT ... ON CONFLICT (job_id) DO NOTHING RETURNING job_id`` of ``jobs`` on ``connection``
    (in its current atomic block, if any), one statement; return the ids that were already in the
    outbox. A conflict is no database error: the caller's transaction stays usable (``bulk_create
    (ignore_conflicts=True)`` would not tell which rows it skipped).

    Values are prepared by the model's fields (time zones, each backend's adaptation) and bound;
    the table and column names come from the model (the table name is validated by ``conf``).
    """
    from reliable_job.integrations.django.models import OutboxJob

    now = _utc(datetime.now(timezone.utc), connection)
    fields = [f for f in OutboxJob._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    params: list[Any] = []
    for j in jobs:
        obj = OutboxJob(
            job_id=j.job_id,
            task_name=j.task_name,
            queue=j.queue,
            message=j.message,
            eta=_utc(j.eta, connection),
            created_at=now,
            updated_at=now,
        )
        params += [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    table = validate_table_name(OutboxJob._meta.db_table)
    columns = ", ".join(quote(f.column) for f in fields)
    # Identifiers only: the validated table name and the model's own columns; values are bound.
    sql = (
        f"INSERT INTO {quote(table)} ({columns}) "  # noqa: S608
        f"VALUES {', '.join([row] * len(jobs))} "
        f"ON CONFLICT ({quote('job_id')}) DO NOTHING RETURNING {quote('job_id')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return conflicting_ids(jobs, (r[0] for r in cursor.fetchall()))
