"""Every statement the outbox runs, built once from its ``Table``, in one place.

Values are bound parameters, named in each statement's docstring; the claims' state is a literal
(see :attr:`OutboxStatements.claim_by_select`). The staging INSERT depends on the dialect: it is
built, and compiled for the driver, on first use and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Delete,
    Dialect,
    Insert,
    Select,
    Table,
    Update,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from reliable_job import schema
from reliable_job.ports import StagedJob

CLAIM_PLAN = "SELECT set_config('enable_sort', 'off', true), set_config('synchronous_commit', 'off', true)"
"""The claim's transaction settings, in one round trip (``set_config(..., true)`` is ``SET
LOCAL``: for the claim's transaction only).

``enable_sort = off``: claims walk the partial index ``ix_<table>_pending`` in id order, whatever
the statistics say. Without it, on a table not analyzed yet (a fresh table, a burst of inserts
before autovacuum's ANALYZE) the planner may fetch every pending row through ``ix_<table>_state``
and sort them all for each batch.

``synchronous_commit = off``: the claim's COMMIT does not wait for its WAL to reach the disk (see
:data:`BOOKKEEPING_COMMIT`)."""

BOOKKEEPING_COMMIT = "SET synchronous_commit = off"
"""Run once on the connection completion keeps (its DELETEs and a retry's postpone).

The relay's and the worker's bookkeeping (pending -> sent, a finished job's DELETE) commit
without waiting for the disk: only a PostgreSQL crash (or the machine's) in the next few hundred
milliseconds (``wal_writer_delay`` x 3 at most) can undo them, and undoing one only puts a row
back as it was before: a claimed row pending again (published again), a finished job's row
``sent`` again (published again by the loss check or ``redeliver_after``). A duplicate after a
crash, never a loss: staging, which the promise rests on, commits in the application's own
transaction, with its settings. A later synchronous commit on the server flushes these too."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class OutboxStatements:
    """The statements of one outbox table."""

    def __init__(self, table: Table) -> None:
        self.table = t = table
        self.notify_channel = schema.notify_channel(table.name)
        self._inserts: dict[tuple[str, bool], Insert] = {}
        self._driver_sql: dict[tuple[str, bool], tuple[str, dict[str, Any]]] = {}

        # -- claims: bind ``now`` and ``limit`` -----------------------------------------------
        # The state is a literal, not a parameter: a prepared (generic) plan must still match
        # the partial index's predicate (state = 'pending').
        publishable = (
            select(t.c.id)
            .where(t.c.state == literal_column(f"'{schema.PENDING}'"))
            .where(or_(t.c.available_at.is_(None), t.c.available_at <= bindparam("now")))
            .order_by(t.c.id)
            .limit(bindparam("limit"))
        )
        self.claim_by_select: Select[Any] = publishable.with_only_columns(
            t.c.id, t.c.job_id, t.c.message, t.c.attempts
        )
        """The claim by SELECT (SQLite: one writer at a time, BEGIN IMMEDIATE; then leased)."""
        # ARRAY(subquery) is an InitPlan: run exactly once, then the update reaches its rows
        # through the primary key. (A join with the subquery can be planned as a nested loop
        # rescanning it for every row of the table when the statistics are off.)
        picked = func.array(publishable.with_for_update(skip_locked=True).scalar_subquery())
        self.claim_by_update: Update = (
            update(t)
            .where(t.c.id == any_(picked))
            .values(
                state=schema.SENT,
                sent_at=bindparam("now"),
                updated_at=bindparam("now"),
                available_at=None,
                attempts=t.c.attempts + 1,
            )
            .returning(t.c.id, t.c.job_id, t.c.message, t.c.attempts)
        )
        """The claim on PostgreSQL: lock up to ``limit`` publishable rows nobody else holds (SKIP
        LOCKED, through the partial index) and mark them sent, in one statement."""

        # -- a claim's rows: bind ``row_id`` (``ids`` for mark_sent) ----------------------------
        now = bindparam("now", type_=t.c.updated_at.type)
        retry_at = bindparam("retry_at", type_=t.c.available_at.type)
        by_id = update(t).where(t.c.id == bindparam("row_id"))
        self.mark_sent: Update = (
            update(t)
            .where(t.c.id.in_(bindparam("ids", expanding=True)))
            .values(
                state=schema.SENT,
                sent_at=now,
                updated_at=now,
                available_at=None,
                attempts=t.c.attempts + 1,
            )
        )
        """Rows claimed by SELECT, published: ``ids``, ``now``."""
        self.mark_dead: Update = by_id.values(
            state=schema.DEAD,
            attempts=bindparam("new_attempts"),
            last_error=bindparam("error"),
            updated_at=now,
        )
        """A claimed row that will never publish: ``new_attempts``, ``error``, ``now``."""
        self.mark_retry: Update = by_id.values(
            state=schema.PENDING,
            attempts=bindparam("new_attempts"),
            last_error=bindparam("error"),
            available_at=retry_at,
            updated_at=now,
        )
        """A claimed row that failed to publish, pending again later: ``new_attempts``, ``error``,
        ``retry_at``, ``now``."""
        self.defer: Update = by_id.values(
            state=schema.PENDING,
            attempts=bindparam("new_attempts"),
            available_at=retry_at,
            updated_at=now,
        )
        """A claimed row left for later, as it was before the claim (its ``last_error`` kept):
        ``new_attempts`` (the row's before the claim), ``retry_at``, ``now``."""
        self.release: Update = by_id.values(
            state=schema.PENDING,
            attempts=bindparam("new_attempts"),
            available_at=None,
        )
        """A row claimed by UPDATE the relay did not report: pending at once, ``new_attempts``
        as before the claim."""

        # -- the claim by lease (SQLite): bind ``lease_until`` ----------------------------------
        # A claim's first, short transaction pushes its rows' available_at to the lease's end (no
        # other claim takes them meanwhile); its second applies the relay's reports, only to rows
        # whose lease is still this claim's (same state, same available_at).
        leased = (t.c.state == literal_column(f"'{schema.PENDING}'")) & (
            t.c.available_at == bindparam("lease_until", type_=t.c.available_at.type)
        )
        self.lease: Update = (
            update(t)
            .where(t.c.id.in_(bindparam("ids", expanding=True)))
            .values(available_at=bindparam("lease_until", type_=t.c.available_at.type))
        )
        """Lease claimed rows: ``ids``, ``lease_until``."""
        self.leased_mark_sent: Update = self.mark_sent.where(leased)
        """:attr:`mark_sent` while the lease holds: ``ids``, ``now``, ``lease_until``."""
        self.leased_mark_dead: Update = self.mark_dead.where(leased)
        self.leased_mark_retry: Update = self.mark_retry.where(leased)
        self.leased_defer: Update = self.defer.where(leased)
        self.leased_release: Update = (
            update(t)
            .where(t.c.id.in_(bindparam("ids", expanding=True)))
            .where(leased)
            .values(available_at=None)
        )
        """Leased rows the relay did not report (or a failed pass): due again at once: ``ids``,
        ``lease_until``."""

        # -- completion: bind ``job_ids`` ---------------------------------------------------
        # PostgreSQL: one array parameter (one statement text, whatever the batch size).
        self.delete_any_job: Delete = delete(t).where(
            t.c.job_id == any_(bindparam("job_ids", type_=ARRAY(t.c.job_id.type)))
        )
        self.delete_jobs: Delete = delete(t).where(t.c.job_id.in_(bindparam("job_ids", expanding=True)))

        # -- the CLI and the relay's housekeeping -------------------------------------------
        self.bury: Update = (
            update(t)
            .where(t.c.job_id == bindparam("target_job_id"))
            .values(state=schema.DEAD, last_error=bindparam("error"), updated_at=now)
        )
        """``target_job_id``, ``error``, ``now``."""
        self.retry_dead: Update = (
            update(t)
            .where(t.c.state == schema.DEAD)
            .values(state=schema.PENDING, attempts=0, available_at=None, updated_at=now)
        )
        """``now``."""
        cutoff = bindparam("cutoff", type_=t.c.sent_at.type)
        stale = (
            (t.c.state == schema.SENT) & (t.c.sent_at <= cutoff) & (or_(t.c.eta.is_(None), t.c.eta <= cutoff))
        )
        self.requeue_dead: Update = (
            update(t)
            .where(stale & (t.c.attempts >= bindparam("max_deliveries")))
            .values(state=schema.DEAD, last_error=bindparam("error"), updated_at=now)
        )
        """Sent before ``cutoff``, published ``max_deliveries`` times: ``error``, ``now``."""
        self.requeue: Update = (
            update(t)
            .where(stale)
            .values(state=schema.PENDING, available_at=None, last_error=bindparam("error"), updated_at=now)
        )
        """Sent before ``cutoff``: pending again, ``error``, ``now``."""
        self._lost_message_statements(t)

        # -- retries: a job published again under its own id, due later ------------------------
        self.postpone: Update = (
            update(t)
            .where(t.c.job_id == bindparam("target_job_id"))
            .where(t.c.state != schema.DEAD)
            .values(eta=bindparam("due", type_=t.c.eta.type), sent_at=now, updated_at=now)
        )
        """Its row due at ``due`` (UTC), published ``now``: ``target_job_id``, ``due``, ``now``."""

    def _lost_message_statements(self, t: Table) -> None:
        """The lost-message checks (:mod:`reliable_job.recovery`): a page of ``sent`` rows, and
        requeueing one of them only as it was checked (still ``sent``, same ``attempts``)."""
        cutoff = bindparam("cutoff", type_=t.c.sent_at.type)
        sent_before = (t.c.state == schema.SENT) & (t.c.sent_at <= cutoff) & (t.c.id > bindparam("after_id"))
        page = (
            select(t.c.id, t.c.job_id, t.c.message, t.c.attempts).order_by(t.c.id).limit(bindparam("limit"))
        )
        self.sent_page: Select[Any] = page.where(sent_before)
        """``sent`` at or before ``cutoff``, ``id > after_id``, by id: ``cutoff``, ``after_id``,
        ``limit``."""
        self.sent_due_page: Select[Any] = page.where(sent_before & or_(t.c.eta.is_(None), t.c.eta <= cutoff))
        """The same, due at or before ``cutoff`` too."""
        as_checked = update(t).where(
            (t.c.id == bindparam("row_id")) & (t.c.state == schema.SENT) & (t.c.attempts == bindparam("seen"))
        )
        now = bindparam("now", type_=t.c.updated_at.type)
        self.requeue_checked: Update = as_checked.values(
            state=schema.PENDING, available_at=None, last_error=bindparam("error"), updated_at=now
        )
        """``row_id``, ``seen`` (its attempts when checked), ``error``, ``now``."""
        self.bury_checked: Update = as_checked.values(
            state=schema.DEAD, last_error=bindparam("error"), updated_at=now
        )
        """``row_id``, ``seen``, ``error``, ``now``."""

    # -- staging -----------------------------------------------------------------------------

    def insert(self, dialect: str, notify: bool = False) -> Insert:
        """The staging INSERT; with ``notify`` (PostgreSQL) it also wakes the relays, in the same
        statement: ``updated_at`` is read through ``pg_notify`` (no extra round trip). Its rows
        come from :meth:`rows` with the same ``notify``."""
        stmt = self._inserts.get((dialect, notify))
        if stmt is None:
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                pg = pg_insert(self.table)
                if notify:
                    staged_at = bindparam("staged_at", type_=self.table.c.updated_at.type)
                    pg = pg.values(
                        updated_at=select(staged_at)
                        .select_from(func.pg_notify(self.notify_channel, ""))
                        .scalar_subquery()
                    )
                stmt = pg.on_conflict_do_nothing(index_elements=["job_id"])
            elif dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                stmt = sqlite_insert(self.table).on_conflict_do_nothing(index_elements=["job_id"])
            else:
                stmt = insert(self.table)
            self._inserts[(dialect, notify)] = stmt
        return stmt

    def insert_returning(self, dialect: str, notify: bool = False) -> Insert:
        """:meth:`insert` returning the ``job_id`` of each row it inserted: a batch of several jobs
        tells which ids were already in the outbox (``ON CONFLICT DO NOTHING`` skipped them)."""
        key = (f"{dialect}+returning", notify)
        stmt = self._inserts.get(key)
        if stmt is None:
            stmt = self._inserts[key] = self.insert(dialect, notify).returning(self.table.c.job_id)
        return stmt

    def driver_insert(self, dialect: Dialect, notify: bool) -> tuple[str, dict[str, Any]]:
        """The staging INSERT of :meth:`insert` as the driver's SQL text, compiled once per
        dialect: named parameters (the keys of :meth:`rows`) plus the statement's constant ones
        (the ``pg_notify`` channel), to merge into every row."""
        key = (f"{dialect.name}+{dialect.driver}", notify)
        found = self._driver_sql.get(key)
        if found is None:
            keys = list(self.rows([StagedJob("", "", "", "", None)], notify)[0])
            columns = [k for k in keys if k in self.table.c]
            compiled = self.insert(dialect.name, notify).compile(
                dialect=dialect,
                column_keys=columns,
                for_executemany=True,  # no RETURNING
            )
            constants = {k: v for k, v in compiled.params.items() if k not in keys}
            found = self._driver_sql[key] = (compiled.string, constants)
        return found

    @staticmethod
    def rows(jobs: Sequence[StagedJob], notify: bool = False) -> list[dict[str, Any]]:
        """The staging INSERT's parameters, one dict per job."""
        now = utcnow()
        last = "staged_at" if notify else "updated_at"
        return [
            {
                "job_id": j.job_id,
                "task_name": j.task_name,
                "queue": j.queue,
                "message": j.message,
                "eta": j.eta,
                "created_at": now,
                last: now,
            }
            for j in jobs
        ]
