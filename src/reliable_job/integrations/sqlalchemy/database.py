"""The outbox on SQLAlchemy: staging writers that join the caller's transaction, and the store the
relay, completion and CLI use."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    MetaData,
    Table,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, scoped_session

from reliable_job import schema
from reliable_job.errors import ConfigurationError, DatabaseUnavailable, StagingError
from reliable_job.ports import ClaimedRow, OutboxStatus, OutboxWriter, StagedJob
from reliable_job.settings import Settings
from reliable_job.staging import Stager

logger = logging.getLogger(__name__)


_CLAIM_PLAN = "SET LOCAL enable_sort = off"
"""Claims walk the partial index ``ix_<table>_pending`` in id order, whatever the statistics say.

Without it, on a table not analyzed yet (a fresh table, a burst of inserts before autovacuum's
ANALYZE) the planner may fetch every pending row through ``ix_<table>_state`` and sort them all
for each batch. ``SET LOCAL`` lasts for the claim's transaction only."""

_INHERITED: list[Any] = []
"""Connections a forked child inherited from its parent: kept alive, never touched."""


def _row_id(row: ClaimedRow) -> int:
    return row.id


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def create_outbox_engine(url: str, **kwargs: Any) -> Engine:
    """An engine suited to the outbox: pre-ping on servers; on SQLite, WAL, a busy timeout, explicit
    ``BEGIN`` (so savepoints work) and ``BEGIN IMMEDIATE`` for the relay's claims (one writer)."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
            _sqlite_immediate(engine)
        else:
            kwargs.setdefault("pool_pre_ping", True)
            engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from exc
    _dispose_after_fork(engine)
    return engine


_IMMEDIATE = "reliable_job_sqlite_immediate"


def _sqlite_immediate(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _dispose_after_fork(engine: Engine) -> None:
    # Connections must never be shared with a forked child (Celery's prefork pool).
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))


class _Claim:
    """A claim by ``SELECT``: rows are marked as the relay reports them (SQLite, others)."""

    def __init__(self, db: SQLAlchemyDatabase, conn: Connection, rows: list[ClaimedRow]) -> None:
        self._db = db
        self._conn = conn
        self.rows = rows

    def mark_sent(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        t = self._db.table
        now = utcnow()
        self._conn.execute(
            update(t)
            .where(t.c.id.in_(list(ids)))
            .values(
                state=schema.SENT, sent_at=now, updated_at=now, available_at=None, attempts=t.c.attempts + 1
            )
        )

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        t = self._db.table
        now = utcnow()
        values: dict[str, Any] = {"attempts": t.c.attempts + 1, "last_error": error, "updated_at": now}
        if retry_in is None:
            values["state"] = schema.DEAD
        else:
            values["available_at"] = now + timedelta(seconds=retry_in)
        self._conn.execute(update(t).where(t.c.id == row.id).values(**values))

    def finish(self) -> None:
        """Nothing to undo: unmarked rows were never changed."""


class _SentClaim:
    """A claim by ``UPDATE ... RETURNING`` (PostgreSQL): one statement locks the rows and marks
    them sent, in the claim's transaction, so a pass is claim -> publish -> COMMIT. Rows the relay
    reports failed, or does not report, are put back to pending (or dead) before the COMMIT; a
    crash or an outage rolls everything back, exactly as with a claim by ``SELECT``."""

    def __init__(self, db: SQLAlchemyDatabase, conn: Connection, rows: list[ClaimedRow]) -> None:
        self._db = db
        self._conn = conn
        self.rows = rows
        self._settled: set[int] = set()

    def mark_sent(self, ids: Sequence[int]) -> None:
        self._settled.update(ids)  # the claim marked them already

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        t = self._db.table
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": row.attempts + 1,
            "last_error": error,
            "updated_at": now,
        }
        if retry_in is None:
            values["state"] = schema.DEAD
        else:
            values.update(state=schema.PENDING, available_at=now + timedelta(seconds=retry_in))
        self._conn.execute(update(t).where(t.c.id == row.id).values(**values))
        self._settled.add(row.id)

    def finish(self) -> None:
        t = self._db.table
        unsettled = [row for row in self.rows if row.id not in self._settled]
        if not unsettled:
            return
        self._conn.execute(
            update(t)
            .where(t.c.id == bindparam("row_id"))
            .values(
                state=schema.PENDING,
                attempts=bindparam("old_attempts"),
                available_at=None,
            ),
            [{"row_id": row.id, "old_attempts": row.attempts} for row in unsettled],
        )


class _Writer:
    """Writes staged rows through ``execute`` (a session's or a connection's)."""

    def __init__(self, db: SQLAlchemyDatabase, target: Session | Connection, dialect: str) -> None:
        self._db = db
        self._target = target
        self._dialect = dialect

    def write(self, jobs: Sequence[StagedJob]) -> None:
        notify = self._dialect == "postgresql" and self._db.stager.notify_due()
        rows = self._db.rows(jobs, notify)
        with self._db.staging_errors():
            conn: Connection | None = None
            if isinstance(self._target, Connection):
                conn = self._target
            elif self._dialect == "postgresql":
                conn = self._target.connection()  # the session's, in its transaction
            if conn is not None and conn.dialect.driver == "psycopg":
                # The hot path of every staged job: the INSERT, compiled once, goes straight to
                # psycopg on the connection of the caller's transaction (savepoints included),
                # skipping SQLAlchemy's per-execution bookkeeping (about a third of staging).
                if not conn.in_transaction():
                    conn.begin()  # what execute() would do (autobegin): the caller commits it
                sql, constants = self._db.driver_insert_sql(conn.dialect, notify)
                params = [{**constants, **row} for row in rows] if constants else rows
                driver = conn.connection.driver_connection
                assert driver is not None
                with driver.cursor() as cursor:
                    if len(params) == 1:
                        cursor.execute(sql, params[0])
                    else:
                        cursor.executemany(sql, params)
                return
            self._target.execute(self._db.insert_statement(self._dialect, notify), rows)


class _OwnTransactionWriter:
    def __init__(self, db: SQLAlchemyDatabase) -> None:
        self._db = db

    def write(self, jobs: Sequence[StagedJob]) -> None:
        engine = self._db.engine
        dialect = engine.dialect.name
        notify = dialect == "postgresql" and self._db.stager.notify_due()
        with self._db.staging_errors(), engine.begin() as conn:
            conn.execute(self._db.insert_statement(dialect, notify), self._db.rows(jobs, notify))


class _PostgresListener:
    """``LISTEN`` on a connection of its own (autocommit, outside the pool), for one relay."""

    def __init__(self, engine: Engine, channel: str) -> None:
        import socket

        from psycopg import sql

        self._proxy = engine.raw_connection()
        self._proxy.detach()  # never goes back to the pool; closed with the listener
        try:
            conn: Any = self._proxy.dbapi_connection
            conn.rollback()
            conn.autocommit = True
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._conn = conn
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except BaseException:
            self._proxy.close()
            raise

    def wait(self, timeout: float) -> bool:
        import select

        fd = self._conn.fileno()
        ready, _, _ = select.select([fd, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            with suppress(BlockingIOError):
                self._wake_r.recv(4096)
        notified = False
        if fd in ready:
            for _ in self._conn.notifies(timeout=0):
                notified = True
        return notified

    def interrupt(self) -> None:
        with suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        try:
            self._proxy.close()
        finally:
            self._wake_r.close()
            self._wake_w.close()


class SQLAlchemyDatabase:
    """The outbox table in one SQLAlchemy database."""

    def __init__(self, settings: Settings, *, metadata: MetaData | None = None) -> None:
        self.settings = settings
        if settings.engine is not None:
            self.engine: Engine = settings.engine
            _dispose_after_fork(self.engine)
        else:
            self.engine = create_outbox_engine(settings.database_url)
        # Claims open with BEGIN IMMEDIATE on SQLite (one writer); the option is ignored elsewhere.
        self._claim_engine = self.engine.execution_options(**{_IMMEDIATE: True})
        self.table: Table = (
            metadata.tables.get(settings.table_name) if metadata is not None else None
        ) or _table(settings.table_name)
        self._inserts: dict[tuple[str, bool], Insert] = {}
        self._driver_sql: dict[tuple[str, bool], tuple[str, dict[str, Any]]] = {}
        t = self.table
        # The state is a literal, not a parameter: a prepared (generic) plan must still match
        # the partial index's predicate (state = 'pending').
        publishable = (
            select(t.c.id)
            .where(t.c.state == literal_column(f"'{schema.PENDING}'"))
            .where(or_(t.c.available_at.is_(None), t.c.available_at <= bindparam("now")))
            .order_by(t.c.id)
            .limit(bindparam("limit"))
        )
        self._claim_select = publishable.with_only_columns(t.c.id, t.c.job_id, t.c.message, t.c.attempts)
        """The claim by SELECT (SQLite: one writer at a time, BEGIN IMMEDIATE)."""
        # ARRAY(subquery) is an InitPlan: run exactly once, then the update reaches its rows
        # through the primary key. (A join with the subquery can be planned as a nested loop
        # rescanning it for every row of the table when the statistics are off.)
        picked = func.array(publishable.with_for_update(skip_locked=True).scalar_subquery())
        self._claim_sent = (
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
        self.stager = Stager(
            settings,
            adapt=self.writer_for,
            own_transaction=lambda: _OwnTransactionWriter(self),
        )
        # PostgreSQL: one array parameter (one statement text, whatever the batch size).
        self._delete_any_job = delete(t).where(
            t.c.job_id == any_(bindparam("job_ids", type_=ARRAY(t.c.job_id.type)))
        )
        self._delete_jobs = delete(t).where(t.c.job_id.in_(bindparam("job_ids", expanding=True)))
        self._completion: tuple[int, Connection] | None = None
        self._completion_lock = threading.Lock()
        self.notify_channel = schema.notify_channel(self.table.name)

    # -- staging -------------------------------------------------------------------------------

    def insert_statement(self, dialect: str, notify: bool = False) -> Insert:
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

    def driver_insert_sql(self, dialect: Any, notify: bool) -> tuple[str, dict[str, Any]]:
        """The staging INSERT of :meth:`insert_statement` as the driver's SQL text, compiled once
        per dialect: named parameters (the keys of :meth:`rows`) plus the statement's constant
        ones (the ``pg_notify`` channel), to merge into every row."""
        key = (f"{dialect.name}+{dialect.driver}", notify)
        found = self._driver_sql.get(key)
        if found is None:
            keys = list(self.rows([StagedJob("", "", "", "", None)], notify)[0])
            columns = [k for k in keys if k in self.table.c]
            compiled = self.insert_statement(dialect.name, notify).compile(
                dialect=dialect,
                column_keys=columns,
                for_executemany=True,  # no RETURNING
            )
            constants = {k: v for k, v in compiled.params.items() if k not in keys}
            found = self._driver_sql[key] = (compiled.string, constants)
        return found

    def rows(self, jobs: Sequence[StagedJob], notify: bool = False) -> list[dict[str, Any]]:
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

    def writer_for(self, target: Any, explicit: bool) -> OutboxWriter | None:
        """The writer joining ``target``'s transaction (see :class:`~reliable_job.staging.Stager`)."""
        if isinstance(target, scoped_session):
            target = target()
        if isinstance(target, Session):
            if not explicit and not target.in_transaction():
                return None
            return _Writer(self, target, target.get_bind().dialect.name)
        if isinstance(target, Connection):
            if not explicit and not target.in_transaction():
                return None
            return _Writer(self, target, target.dialect.name)
        raise ConfigurationError(
            f"cannot stage in {type(target).__name__}: pass a SQLAlchemy Session or Connection"
        )

    # -- the store (relay, completion, CLI) -------------------------------------------------------

    @contextmanager
    def claim(self, limit: int) -> Iterator[_Claim | _SentClaim]:
        now = utcnow()
        with self._unavailable_as_error(), self._claim_engine.begin() as conn:
            claim: _Claim | _SentClaim
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(_CLAIM_PLAN)
                rows = sorted(
                    (
                        ClaimedRow(row_id, job_id, message, attempts - 1)
                        for row_id, job_id, message, attempts in conn.execute(
                            self._claim_sent, {"now": now, "limit": limit}
                        )
                    ),
                    key=_row_id,
                )
                claim = _SentClaim(self, conn, rows)
            else:
                rows = [
                    ClaimedRow(*r) for r in conn.execute(self._claim_select, {"now": now, "limit": limit})
                ]
                claim = _Claim(self, conn, rows)
            yield claim
            claim.finish()

    def listener(self) -> _PostgresListener | None:
        """A relay's :class:`~reliable_job.ports.Wakeup`: ``LISTEN`` on PostgreSQL (psycopg 3);
        ``None`` on SQLite (it polls). Raises when listening fails."""
        if not self.settings.listen_notify or self.engine.dialect.name != "postgresql":
            return None
        if self.engine.dialect.driver != "psycopg":
            raise ConfigurationError(f"LISTEN needs the psycopg (3) driver, not {self.engine.dialect.driver}")
        with self._unavailable_as_error():
            return _PostgresListener(self.engine, self.notify_channel)

    def claim_query(self, dialect: str = "postgresql") -> Any:
        """The statement a claim runs on ``dialect``: bind ``now`` and ``limit``."""
        return self._claim_sent if dialect == "postgresql" else self._claim_select

    def explain_claim(self, limit: int = 500) -> list[str]:
        """PostgreSQL's plan for a claim of ``limit`` rows, as the relay runs it (same statement,
        same planner settings), without running it."""
        compiled = self._claim_sent.compile(dialect=self.engine.dialect)
        params = dict(compiled.params, now=utcnow(), limit=limit)
        with self._unavailable_as_error(), self.engine.connect() as conn:
            conn.exec_driver_sql(_CLAIM_PLAN)
            plan = conn.exec_driver_sql(f"EXPLAIN {compiled.string}", params).scalars().all()
            conn.rollback()
        return [str(line) for line in plan]

    def complete(self, job_id: str) -> int:
        return self.complete_many([job_id])

    def complete_many(self, job_ids: Sequence[str]) -> int:
        """Delete the rows of ``job_ids`` in one statement (completion's batched deletes)."""
        ids = list(job_ids)
        if not ids:
            return 0
        if self.engine.dialect.name != "postgresql":
            with self._unavailable_as_error(), self.engine.begin() as conn:
                return conn.execute(self._delete_jobs, {"job_ids": ids}).rowcount
        # The worker deletes the rows of finished tasks: one autocommit DELETE on a connection
        # the process keeps (no pool checkout, ping, BEGIN or COMMIT round trips).
        with self._completion_lock:
            for attempt in (1, 2):
                conn = self._completion_connection()
                try:
                    return conn.execute(self._delete_any_job, {"job_ids": ids}).rowcount
                except DBAPIError as exc:
                    self._drop_completion_connection()
                    if attempt == 1 and exc.connection_invalidated:
                        continue  # a stale connection (server restart): once more on a new one
                    raise DatabaseUnavailable(f"outbox database error: {exc.orig or exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _completion_connection(self) -> Connection:
        held = self._completion
        if held is not None and held[0] == os.getpid():
            return held[1]
        if held is not None:
            # Inherited through fork: the parent's socket. Never used nor closed here (closing
            # would end the parent's session); kept referenced so it is never garbage collected.
            _INHERITED.append(held[1])
        with self._unavailable_as_error():
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._completion = (os.getpid(), conn)
        return conn

    def _drop_completion_connection(self) -> None:
        held, self._completion = self._completion, None
        if held is not None and held[0] == os.getpid():
            with suppress(Exception):
                held[1].invalidate()
                held[1].close()

    def close(self) -> None:
        """Release the connection completion keeps (PostgreSQL)."""
        with self._completion_lock:
            self._drop_completion_connection()

    # STUB (settings-whole): minimal relay_stores() until the sqla-seam branch lands; resolve
    # any conflict in favour of sqla-seam's version.
    def relay_stores(self) -> list[SQLAlchemyDatabase]:
        """The stores relays drain: this database's own."""
        return [self]

    def bury(self, job_id: str, error: str) -> int:
        t = self.table
        with self._unavailable_as_error(), self.engine.begin() as conn:
            return conn.execute(
                update(t)
                .where(t.c.job_id == job_id)
                .values(state=schema.DEAD, last_error=error, updated_at=utcnow())
            ).rowcount

    def status(self) -> OutboxStatus:
        t = self.table
        with self._unavailable_as_error(), self.engine.connect() as conn:
            by_state = select(t.c.state, func.count()).group_by(t.c.state)
            counts: dict[str, int] = {state: n for state, n in conn.execute(by_state).all()}
            oldest = conn.execute(  # the lowest pending id, through the partial index
                select(t.c.created_at).where(t.c.state == schema.PENDING).order_by(t.c.id).limit(1)
            ).scalar()
        age = None
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=timezone.utc)
            age = max(0.0, (utcnow() - oldest).total_seconds())
        return OutboxStatus(
            pending=counts.get(schema.PENDING, 0),
            sent=counts.get(schema.SENT, 0),
            dead=counts.get(schema.DEAD, 0),
            oldest_pending_seconds=age,
        )

    def retry_dead(self) -> int:
        t = self.table
        with self._unavailable_as_error(), self.engine.begin() as conn:
            return conn.execute(
                update(t)
                .where(t.c.state == schema.DEAD)
                .values(state=schema.PENDING, attempts=0, available_at=None, updated_at=utcnow())
            ).rowcount

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        t = self.table
        now = utcnow()
        cutoff = now - timedelta(seconds=older_than)
        stale = (
            (t.c.state == schema.SENT) & (t.c.sent_at <= cutoff) & (or_(t.c.eta.is_(None), t.c.eta <= cutoff))
        )
        note = f"not completed {older_than:.0f}s after publishing"
        with self._unavailable_as_error(), self.engine.begin() as conn:
            dead = conn.execute(
                update(t)
                .where(stale & (t.c.attempts >= max_deliveries))
                .values(state=schema.DEAD, last_error=f"{note}, {max_deliveries} times", updated_at=now)
            ).rowcount
            requeued = conn.execute(
                update(t)
                .where(stale)
                .values(state=schema.PENDING, available_at=None, last_error=note, updated_at=now)
            ).rowcount
        return requeued, dead

    def create_table(self) -> None:
        with self._unavailable_as_error():
            self.table.metadata.create_all(self.engine, tables=[self.table])

    @contextmanager
    def staging_errors(self) -> Iterator[None]:
        dbapi_error = getattr(self.engine.dialect.loaded_dbapi, "Error", DBAPIError)
        try:
            yield
        except (DBAPIError, dbapi_error) as exc:
            reason = exc.orig or exc if isinstance(exc, DBAPIError) else exc
            raise StagingError(
                f"cannot write to the outbox table {self.table.name!r}: "
                f"{' '.join(str(reason).split())} "
                "(does it exist? see `reliable-job migration` and `reliable-job init-db`)"
            ) from exc

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            raise DatabaseUnavailable(f"outbox database error: {exc.orig or exc}") from exc


def _table(name: str) -> Table:
    from reliable_job.integrations.sqlalchemy.table import outbox_table

    return outbox_table(MetaData(), name)
