"""The job tools' queries on one outbox table (:class:`~reliable_job.ports.OutboxAdmin`):
find, count and show rows, and change them in batches.

Every value is a bound parameter (a task pattern too: ``*`` becomes ``LIKE``'s ``%``, with ``%``,
``_`` and the escape character escaped). A change walks the matching ids in id order, one page of
``batch_size`` ids at a time: the page is read, then changed in a short transaction of its own
whose statement re-checks each row's state (a row a relay or a worker moved on meanwhile is left
alone). The relays' claims never wait behind one long statement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, and_, delete, or_, select, true, update

from reliable_job import schema
from reliable_job.integrations.sqlalchemy.claims import LEASE_SECONDS
from reliable_job.integrations.sqlalchemy.engine import claim_engine, unavailable_as_error
from reliable_job.integrations.sqlalchemy.statements import utcnow
from reliable_job.ports import JobAction, JobFilter, JobRow

logger = logging.getLogger(__name__)

_LIKE_ESCAPE = "\\"


def task_condition(table: Table, pattern: str) -> ColumnElement[bool]:
    """``task_name`` equal to ``pattern``, or ``LIKE`` it when it holds ``*`` (any characters)."""
    if "*" not in pattern:
        return table.c.task_name == pattern
    escaped = pattern.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", r"\%").replace("_", r"\_")
    return table.c.task_name.like(escaped.replace("*", "%"), escape=_LIKE_ESCAPE)


def conditions(table: Table, where: JobFilter) -> ColumnElement[bool]:
    """The filter as one SQL condition (bound parameters only)."""
    t = table
    parts: list[ColumnElement[bool]] = []
    if where.states:
        parts.append(t.c.state.in_(list(where.states)))
    if where.task:
        parts.append(task_condition(t, where.task))
    if where.created_before is not None:
        parts.append(t.c.created_at <= where.created_before)
    if where.waiting:
        parts.append((t.c.state == schema.PENDING) & (t.c.available_at > utcnow()))
    keys: list[ColumnElement[bool]] = []
    if where.ids:
        keys.append(t.c.id.in_(list(where.ids)))
    if where.job_ids:
        keys.append(t.c.job_id.in_(list(where.job_ids)))
    if keys:
        parts.append(or_(*keys))
    return and_(true(), *parts)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class OutboxAdminQueries:
    """The job tools on one outbox table (see the module docstring)."""

    def __init__(self, engine: Engine, table: Table) -> None:
        self.engine = engine
        self.table = table
        # Writes open with BEGIN IMMEDIATE on SQLite: they wait for the write lock up front instead
        # of failing to upgrade a read lock.
        self._write_engine = claim_engine(engine)
        t = table
        self._row_columns = (
            t.c.id,
            t.c.job_id,
            t.c.task_name,
            t.c.queue,
            t.c.state,
            t.c.attempts,
            t.c.last_error,
            t.c.created_at,
            t.c.eta,
            t.c.available_at,
            t.c.sent_at,
            t.c.updated_at,
        )

    def _row(self, values: Sequence[Any], message: str | None = None) -> JobRow:
        (id_, job_id, task, queue, state, attempts, error, created, eta, available, sent, updated) = values
        return JobRow(
            id=id_,
            job_id=job_id,
            task_name=task,
            queue=queue,
            state=state,
            attempts=attempts,
            last_error=error,
            created_at=_utc(created),
            eta=_utc(eta),
            available_at=_utc(available),
            sent_at=_utc(sent),
            updated_at=_utc(updated),
            message=message,
        )

    def find_jobs(self, where: JobFilter, *, limit: int | None = None) -> list[JobRow]:
        stmt = select(*self._row_columns).where(conditions(self.table, where)).order_by(self.table.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with unavailable_as_error(), self.engine.connect() as conn:
            return [self._row(tuple(r)) for r in conn.execute(stmt)]

    def count_jobs(self, where: JobFilter) -> int:
        from sqlalchemy import func

        stmt = select(func.count()).select_from(self.table).where(conditions(self.table, where))
        with unavailable_as_error(), self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def get_jobs(self, key: str) -> list[JobRow]:
        t = self.table
        match = t.c.job_id == key
        if key.isdigit() and len(key) < 19:  # a row id (BIGINT), else only a job id
            match = or_(t.c.id == int(key), match)
        stmt = select(*self._row_columns, t.c.message).where(match).order_by(t.c.id)
        with unavailable_as_error(), self.engine.connect() as conn:
            return [self._row(tuple(r)[:-1], r[-1]) for r in conn.execute(stmt)]

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        if action not in JobAction.ALL:
            raise ValueError(f"unknown job action {action!r}")
        t = self.table
        matching = conditions(self.table, where)
        page = select(t.c.id).order_by(t.c.id).limit(max(1, batch_size))
        total, after = 0, 0
        while True:
            with unavailable_as_error(), self.engine.connect() as conn:
                ids = list(conn.execute(page.where(matching & (t.c.id > after))).scalars())
            if not ids:
                break
            after = ids[-1]
            with unavailable_as_error(), self._write_engine.begin() as conn:
                total += conn.execute(self._change(action, where, ids)).rowcount
            if progress is not None:
                progress(total)
            if len(ids) < batch_size:
                break
        logger.info("job tools: %s changed %d row(s) of %s", action, total, t.name)
        return total

    def _change(self, action: str, where: JobFilter, ids: list[int]) -> Any:
        """The statement changing this page's rows, re-checking each row's state."""
        t = self.table
        now = utcnow()
        in_page = t.c.id.in_(ids)
        if action == JobAction.RETRY_DEAD:
            return (
                update(t)
                .where(in_page & (t.c.state == schema.DEAD))
                .values(state=schema.PENDING, attempts=0, available_at=None, updated_at=now)
            )
        if action == JobAction.PURGE:
            states = list(where.states) or [schema.DEAD]
            return delete(t).where(in_page & t.c.state.in_(states))
        # publish-now: pending rows waiting on a backoff. On SQLite a claim leases its rows by
        # pushing their available_at LEASE_SECONDS ahead: rows due within that window may be in a
        # relay's hands (moving them would break its lease and publish them twice), so they stay.
        horizon = now
        if self.engine.dialect.name == "sqlite":
            horizon = now + timedelta(seconds=LEASE_SECONDS)
        return (
            update(t)
            .where(in_page & (t.c.state == schema.PENDING) & (t.c.available_at > horizon))
            .values(available_at=now, updated_at=now)
        )
