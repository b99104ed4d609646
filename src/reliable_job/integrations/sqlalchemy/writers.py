"""Staging writers: in the caller's session or connection (with a psycopg fast path), or in a
transaction of their own; and the :class:`~reliable_job.staging.Stager` that picks between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session

from reliable_job.errors import ConfigurationError, DuplicateJobError, StagingError
from reliable_job.integrations.sqlalchemy.statements import OutboxStatements
from reliable_job.ports import OutboxWriter, StagedJob
from reliable_job.settings import Settings
from reliable_job.staging import Stager, conflicting_ids


def sqlalchemy_stager(settings: Settings, engine: Engine, statements: OutboxStatements) -> Stager:
    """The stager of one outbox: it joins the caller's SQLAlchemy transaction when there is one,
    and decides (its ``NOTIFY`` throttle) which writes also wake the relays."""
    writers = _Writers(engine, statements)
    stager = Stager(settings, adapt=writers.writer_for, own_transaction=writers.own_transaction)
    writers.notify_due = stager.notify_due
    return stager


class _Writers:
    """Makes the writers of one outbox. ``notify_due`` is the stager's throttle (set once the
    stager exists: the stager needs the writers first)."""

    def __init__(self, engine: Engine, statements: OutboxStatements) -> None:
        self._engine = engine
        self._sql = statements
        self.notify_due: Callable[[], bool] = _never

    def writer_for(self, target: object, explicit: bool) -> OutboxWriter | None:
        """The writer joining ``target``'s transaction, or ``None`` when an implicit target has
        none open (see :class:`~reliable_job.staging.Stager`)."""
        if isinstance(target, scoped_session):
            target = target()
        if isinstance(target, Session):
            if not explicit and not target.in_transaction():
                return None
            return SessionWriter(
                target, target.get_bind().dialect.name, self._sql, self.notify_due, self._engine
            )
        if isinstance(target, Connection):
            if not explicit and not target.in_transaction():
                return None
            return SessionWriter(target, target.dialect.name, self._sql, self.notify_due, self._engine)
        raise ConfigurationError(
            f"cannot stage in {type(target).__name__}: pass a SQLAlchemy Session or Connection"
        )

    def own_transaction(self) -> OutboxWriter:
        return OwnTransactionWriter(self._engine, self._sql, self.notify_due)


def _never() -> bool:
    return False


class SessionWriter:
    """Writes staged rows in the transaction of a session or a connection (the caller's)."""

    def __init__(
        self,
        target: Session | Connection,
        dialect: str,
        statements: OutboxStatements,
        notify_due: Callable[[], bool],
        engine: Engine,
    ) -> None:
        self._target = target
        self._dialect = dialect
        self._sql = statements
        self._notify_due = notify_due
        self._engine = engine

    def write(self, jobs: Sequence[StagedJob]) -> None:
        notify = self._dialect == "postgresql" and self._notify_due()
        rows = self._sql.rows(jobs, notify)
        with staging_errors(self._engine, self._sql):
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
                sql, constants = self._sql.driver_insert(conn.dialect, notify)
                params = [{**constants, **row} for row in rows] if constants else rows
                driver = conn.connection.driver_connection
                assert driver is not None
                if len(params) == 1:
                    with driver.cursor() as cursor:
                        cursor.execute(sql, params[0])
                        inserted = cursor.rowcount
                    if inserted == 0:  # ON CONFLICT DO NOTHING: the id is taken
                        raise DuplicateJobError([jobs[0].job_id])
                    return
            conflicts = insert_rows(self._target, self._sql, self._dialect, notify, jobs, rows)
        if conflicts:
            raise DuplicateJobError(conflicts)


class OwnTransactionWriter:
    """Writes staged rows in a transaction of its own, committed at once."""

    def __init__(self, engine: Engine, statements: OutboxStatements, notify_due: Callable[[], bool]) -> None:
        self._engine = engine
        self._sql = statements
        self._notify_due = notify_due

    def write(self, jobs: Sequence[StagedJob]) -> None:
        dialect = self._engine.dialect.name
        notify = dialect == "postgresql" and self._notify_due()
        rows = self._sql.rows(jobs, notify)
        with staging_errors(self._engine, self._sql), self._engine.begin() as conn:
            conflicts = insert_rows(conn, self._sql, dialect, notify, jobs, rows)
        if conflicts:  # raised once the other jobs of the call are committed
            raise DuplicateJobError(conflicts)


def insert_rows(
    target: Session | Connection,
    statements: OutboxStatements,
    dialect: str,
    notify: bool,
    jobs: Sequence[StagedJob],
    rows: list[dict[str, Any]],
) -> list[str]:
    """Insert ``rows`` (the staging INSERT, ``ON CONFLICT DO NOTHING``) in ``target``'s
    transaction in one statement; return the ids of ``jobs`` that were already in the outbox.

    A conflict is no database error, so the caller's transaction stays usable (on PostgreSQL an
    error would abort it). ``RETURNING job_id`` tells which rows went in, in the same statement
    (SQLAlchemy would add ``RETURNING id`` anyway on PostgreSQL).
    """
    stmt = statements.insert_returning(dialect, notify)
    return conflicting_ids(jobs, target.execute(stmt, rows[0] if len(rows) == 1 else rows).scalars())


@contextmanager
def staging_errors(engine: Engine, statements: OutboxStatements) -> Iterator[None]:
    """A database error while staging is a :class:`~reliable_job.errors.StagingError` that names
    the table and the likely cause."""
    dbapi_error = getattr(engine.dialect.loaded_dbapi, "Error", DBAPIError)
    try:
        yield
    except (DBAPIError, dbapi_error) as exc:
        reason = exc.orig or exc if isinstance(exc, DBAPIError) else exc
        raise StagingError(
            f"cannot write to the outbox table {statements.table.name!r}: "
            f"{' '.join(str(reason).split())} "
            "(does it exist? see `reliable-job migration` and `reliable-job init-db`)"
        ) from exc
