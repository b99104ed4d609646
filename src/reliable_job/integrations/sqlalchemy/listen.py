"""The relays' wake-up on PostgreSQL: ``LISTEN`` on a connection of its own."""

from __future__ import annotations

import select
import socket
from contextlib import suppress
from typing import Any

from sqlalchemy import Engine

from reliable_job.errors import ConfigurationError
from reliable_job.integrations.sqlalchemy.engine import unavailable_as_error


def postgres_listener(engine: Engine, channel: str) -> PostgresListener:
    """A relay's :class:`~reliable_job.ports.Wakeup` on ``channel``; needs psycopg (3). Raises
    when listening fails."""
    if engine.dialect.driver != "psycopg":
        raise ConfigurationError(f"LISTEN needs the psycopg (3) driver, not {engine.dialect.driver}")
    with unavailable_as_error():
        return PostgresListener(engine, channel)


class PostgresListener:
    """``LISTEN`` on a connection of its own (autocommit, outside the pool), for one relay."""

    def __init__(self, engine: Engine, channel: str) -> None:
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
