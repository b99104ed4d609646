"""Engines and connections for the outbox: the engine factory (SQLite pragmas, ``BEGIN IMMEDIATE``
for claims), disposal after ``fork``, database errors as the core's exceptions, and the connection
completion keeps for its deletes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, DBAPIError

from reliable_job.errors import ConfigurationError, DatabaseUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMMEDIATE = "reliable_job_sqlite_immediate"
"""Execution option: on SQLite, open the transaction with ``BEGIN IMMEDIATE`` (the claims: one
writer at a time, taken before reading). Ignored by other dialects."""

_INHERITED: list[Connection] = []
"""Connections a forked child inherited from its parent: kept alive, never touched."""


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
    dispose_after_fork(engine)
    return engine


def claim_engine(engine: Engine) -> Engine:
    """``engine`` whose transactions open with ``BEGIN IMMEDIATE`` on SQLite (see :data:`IMMEDIATE`)."""
    return engine.execution_options(**{IMMEDIATE: True})


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
        immediate = conn.get_execution_options().get(IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def dispose_after_fork(engine: Engine) -> None:
    """Connections must never be shared with a forked child (Celery's prefork pool)."""
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))


@contextmanager
def unavailable_as_error() -> Iterator[None]:
    """A database error is the core's :class:`~reliable_job.errors.DatabaseUnavailable`."""
    try:
        yield
    except DBAPIError as exc:
        raise DatabaseUnavailable(f"outbox database error: {exc.orig or exc}") from exc


class KeptConnection:
    """One autocommit connection per process, kept open (completion's deletes on PostgreSQL: no
    pool checkout, ping, ``BEGIN`` or ``COMMIT`` round trips).

    A stale connection (server restart) is replaced once per call; a forked child opens its own and
    never touches, nor closes, the one it inherited.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._held: tuple[int, Connection] | None = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[Connection], T]) -> T:
        """``work(connection)``, once more on a new connection if the kept one was lost."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return work(conn)
                except DBAPIError as exc:
                    self._drop()
                    if attempt == 1 and exc.connection_invalidated:
                        continue  # a stale connection (server restart): once more on a new one
                    raise DatabaseUnavailable(f"outbox database error: {exc.orig or exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connection(self) -> Connection:
        held = self._held
        if held is not None and held[0] == os.getpid():
            return held[1]
        if held is not None:
            # Inherited through fork: the parent's socket. Never used nor closed here (closing
            # would end the parent's session); kept referenced so it is never garbage collected.
            _INHERITED.append(held[1])
        with unavailable_as_error():
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._held = (os.getpid(), conn)
        return conn

    def _drop(self) -> None:
        held, self._held = self._held, None
        if held is not None and held[0] == os.getpid():
            with suppress(Exception):
                held[1].invalidate()
                held[1].close()
