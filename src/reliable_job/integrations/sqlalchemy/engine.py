"""Engines and connections for the outbox: the engine factory (SQLite pragmas, ``BEGIN IMMEDIATE``
for claims, or for every transaction of an application's engine), the engine the store uses on a
SQLite file the application handed over, disposal after ``fork``, database errors as the core's
exceptions, and the connection completion keeps for its deletes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from reliable_job.errors import ConfigurationError, DatabaseUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMMEDIATE = "reliable_job_sqlite_immediate"
"""Execution option: on SQLite, open the transaction with ``BEGIN IMMEDIATE`` (the claims: one
writer at a time, taken before reading). Ignored by other dialects."""

_INHERITED: list[Connection] = []
"""Connections a forked child inherited from its parent: kept alive, never touched."""


def create_outbox_engine(url: str | URL, *, immediate: bool = False, **kwargs: Any) -> Engine:
    """An engine suited to the outbox: pre-ping on servers; on SQLite, WAL, a busy timeout, explicit
    ``BEGIN`` (so savepoints work) and ``BEGIN IMMEDIATE`` for the relay's claims (one writer).

    ``immediate=True`` (SQLite; ignored elsewhere): every transaction opens with ``BEGIN
    IMMEDIATE``, as Django's ``"transaction_mode": "IMMEDIATE"`` does. Use it for the application's
    own engine when its transactions read before they write: a deferred transaction that has read
    cannot take the write lock once another writer (the relay, completion) committed meanwhile,
    and fails with ``database is locked`` whatever the busy timeout; an immediate one waits for the
    lock (up to the busy timeout, 30 s) before it reads."""
    try:
        if make_url(url).get_backend_name() == "sqlite":
            engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
            _sqlite_setup(engine, immediate=immediate)
        else:
            kwargs.setdefault("pool_pre_ping", True)
            engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from exc
    dispose_after_fork(engine)
    return engine


def sqlite_immediate(engine: Engine) -> Engine:
    """Make every transaction of an existing SQLite ``engine`` (Flask-SQLAlchemy's ``db.engine``)
    open with ``BEGIN IMMEDIATE``, with the set-up of :func:`create_outbox_engine` (WAL, a 30 s
    busy timeout, explicit ``BEGIN``); returns ``engine``. Call it before the engine is used: its
    pooled connections are closed, so every connection from now on has the set-up. Other dialects
    are returned unchanged."""
    if engine.dialect.name != "sqlite":
        return engine
    base = _base(engine)
    if event.contains(base, "begin", _begin):
        event.remove(base, "begin", _begin)
    if not event.contains(base, "connect", _connect):
        event.listen(base, "connect", _connect)
    if not event.contains(base, "begin", _begin_immediate):
        event.listen(base, "begin", _begin_immediate)
    base.dispose()
    return engine


def has_outbox_setup(engine: Engine) -> bool:
    """Whether ``engine`` (SQLite) has :func:`create_outbox_engine`'s set-up: explicit ``BEGIN``,
    ``BEGIN IMMEDIATE`` for claims, the busy timeout."""
    return event.contains(_base(engine), "connect", _connect)


def sqlite_file_url(url: URL) -> URL:
    """``url`` (SQLite) with its file as an absolute path, so every engine built from it, in this
    process or a forked one, opens the same file whatever the working directory becomes.

    Raises :class:`~reliable_job.errors.ConfigurationError` for an in-memory database: the relay's
    and completion's connections (other threads, other processes) would each see another one."""
    database = url.database or ""
    uri = str(url.query.get("uri", "")).lower() in ("true", "1")
    if database in ("", ":memory:") or (
        uri and (url.query.get("mode") == "memory" or ":memory:" in database)
    ):
        raise ConfigurationError(
            "the outbox cannot live in an in-memory SQLite database: the relay and the workers "
            "connect on their own and would not see it; use a file (sqlite:///path/to/app.db)"
        )
    if uri or os.path.isabs(database):
        return url
    return url.set(database=os.path.abspath(database))


def outbox_engine_for(engine: Engine) -> Engine:
    """The engine the store uses for an engine the application handed over.

    On SQLite the relay's claims and completion's deletes must not depend on how the application
    set its engine up (a plain ``create_engine`` lets the driver begin transactions lazily, so a
    claim's ``SELECT`` takes no lock and two relays publish the same rows): unless ``engine`` has
    :func:`create_outbox_engine`'s set-up already, the store opens its own engine on the same
    file, with that set-up. Staging still joins the application's session or connection. Other
    databases use ``engine`` itself."""
    if engine.dialect.name != "sqlite" or has_outbox_setup(engine):
        dispose_after_fork(engine)
        return engine
    url = sqlite_file_url(engine.url)
    logger.debug("the outbox uses an engine of its own on the application's SQLite file")
    return create_outbox_engine(url)


def claim_engine(engine: Engine) -> Engine:
    """``engine`` whose transactions open with ``BEGIN IMMEDIATE`` on SQLite (see :data:`IMMEDIATE`)."""
    return engine.execution_options(**{IMMEDIATE: True})


def _base(engine: Engine) -> Engine:
    """The engine an ``engine.execution_options(...)`` copy was made from (events live there)."""
    proxied = getattr(engine, "_proxied", None)
    return _base(proxied) if isinstance(proxied, Engine) else engine


def _sqlite_setup(engine: Engine, *, immediate: bool) -> None:
    event.listen(engine, "connect", _connect)
    event.listen(engine, "begin", _begin_immediate if immediate else _begin)


def _connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver never begins on its own: _begin does
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


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

    def __init__(self, engine: Engine, on_connect: str | None = None) -> None:
        """``on_connect``: a constant statement run once on each connection opened (session
        settings, e.g. ``statements.BOOKKEEPING_COMMIT``)."""
        self._engine = engine
        self._on_connect = on_connect
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
            if self._on_connect is not None:
                conn.exec_driver_sql(self._on_connect)
        self._held = (os.getpid(), conn)
        return conn

    def _drop(self) -> None:
        held, self._held = self._held, None
        if held is not None and held[0] == os.getpid():
            with suppress(Exception):
                held[1].invalidate()
                held[1].close()
