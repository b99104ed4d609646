"""The relay's side of the broker: publishes stored messages through the app's broker connection,
one round trip per batch where the transport supports it (kombu's publish batches)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kombu import Producer
from kombu.exceptions import OperationalError

from reliable_job.errors import BrokerUnavailable
from reliable_job.integrations.celery.message import publish_arguments
from reliable_job.ports import ClaimedRow

logger = logging.getLogger(__name__)

_TIMEOUTS = {"socket_timeout": 10, "socket_connect_timeout": 5}


class KombuBroker:
    """Implements the core's ``Broker`` port with a Celery app's real broker connection."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._connection: Any = None
        self._producer: Any = None
        self._declared: set[str] = set()
        """Queues declared on the current connection: declared once, not for every message."""

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            options = dict(_TIMEOUTS, **(self.app.conf.broker_transport_options or {}))
            self._connection = self.app.connection_for_write(transport_options=options)
            self._producer = Producer(self._connection, auto_declare=False)
        return self._producer

    def connect(self) -> None:
        try:
            self._ensure_producer()
            self._connection.ensure_connection(max_retries=0)
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        failures: dict[int, Exception] = {}
        try:
            producer = self._ensure_producer()
            with producer.batch(max_size=max(1, len(rows))):
                for row in rows:
                    try:
                        body, kwargs = publish_arguments(row.message)
                        declare = self._to_declare(kwargs.pop("declare_names"))
                        producer.publish(
                            body, declare=declare, retry=False, serializer=None,
                            compression=None, **kwargs,
                        )
                        self._declared.update(queue.name for queue in declare)
                    except Exception as exc:
                        if self._is_outage(exc):
                            raise
                        failures[row.id] = exc
        except BrokerUnavailable:
            raise
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc
        return failures

    def _unavailable(self, exc: Exception) -> BrokerUnavailable:
        """Drop the broken connection; the error the relay treats as an outage."""
        self.close()
        return BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}")

    def _to_declare(self, names: list[str]) -> list[Any]:
        queues = self.app.amqp.queues
        return [queues[name] for name in names if name not in self._declared]

    def _outage_errors(self) -> tuple[type[BaseException], ...]:
        conn = self._connection
        errors: tuple[type[BaseException], ...] = (OperationalError, OSError)
        if conn is not None:
            errors += tuple(conn.connection_errors) + tuple(conn.channel_errors)
        return errors

    def _is_outage(self, exc: BaseException) -> bool:
        """A connection error, or an error raised from one: kombu's Redis publish batch reports a
        lost connection as ``BatchPublishError`` raised from the redis ``ConnectionError``."""
        outage = self._outage_errors()
        cause: BaseException | None = exc
        for _ in range(10):
            if cause is None:
                break
            if isinstance(cause, outage):
                return True
            cause = cause.__cause__
        return False

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._declared.clear()
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("error closing the broker connection", exc_info=True)
