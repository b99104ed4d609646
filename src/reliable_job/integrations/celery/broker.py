"""The relay's side of the broker: publishes stored messages through the app's broker connection.

On kombu's plain Redis transport (``redis://``, ``rediss://``) a batch takes a fast path
(``redis_fast_path.py``): the finished Redis payload stored with the message (``message.py``,
envelope v2) is pushed with a fresh delivery tag, in one pipeline per batch, exactly as kombu's
Redis transport would have put it there. Anything the fast path does not cover (other exchange
types, expiring queues, an unbound routing key, a non-default body encoding, Sentinel, pipelines
Redis may retry, other transports) goes through kombu's own publish (``kombu_path.py``). This
module holds the connection and picks the path; what a broker error means is ``refusals.py``.

A row the relay cannot read (corrupt JSON, a field of the wrong type, a format version newer than
this release reads) is that row's failure in the returned mapping, never an exception for the
batch: the rows around it are published. A stored envelope a tool re-serialized (other spacing or
key order) misses the fast path's slicing and is decoded and checked instead.

Only a lost connection or a timeout is an outage (``refusals.is_outage``: ``BrokerUnavailable``,
the relay keeps the whole batch pending). Anything the broker refuses for one row or one Redis
key is that row's failure, and every other row of the batch is published: a command error
(``WRONGTYPE`` for a key of the wrong type, ``OOM`` under ``noeviction``, ``MISCONF``...) fails
the rows pushed to that key, or routed through that exchange's binding table; an unknown queue
(``QueueNotFound`` with ``task_create_missing_queues`` off) or any other routing error fails its
row; a message routed to no queue at all, which kombu's Redis transport would silently drop (an
exchange with no binding for its routing key, as Celery's own publish would drop it), fails as
:class:`~reliable_job.errors.MessageUnroutable`. On Redis both paths run their pushes as one
pipeline executed once, without ``raise_on_error``: every command runs and reports its own
result, so the rows whose pushes succeeded are reported published, never pushed twice by a pass.
A row pushed to several keys fails if any of its pushes failed (its retry may then duplicate the
copies that were accepted: at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kombu import Producer

from reliable_job.errors import BrokerUnavailable
from reliable_job.integrations.celery import kombu_path, lost, redis_fast_path
from reliable_job.integrations.celery.decoding import Route
from reliable_job.integrations.celery.refusals import from_redis, is_outage
from reliable_job.integrations.celery.sent_events import SentEvents
from reliable_job.ports import ClaimedRow, SentRow

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
        self._routes: dict[str, Route] = {}
        """Parsed routing fields by their JSON text: most rows of a batch share a handful."""
        self.fast_path = True
        """Use the Redis fast path where it applies (tests turn it off to compare both paths)."""
        self.sent_events = SentEvents(app)
        """Celery's ``task-sent`` event for each published job (``task_send_sent_event``)."""

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            options = dict(_TIMEOUTS, **(self.app.conf.broker_transport_options or {}))
            self._connection = self.app.connection_for_write(transport_options=options)
            self._producer = Producer(self._connection, auto_declare=False)
        return self._producer

    def connect(self) -> None:
        """Connect, or raise ``BrokerUnavailable``: a server that answers the connection's own
        handshake with an error (Redis refuses even ``PING`` under ``MISCONF``) cannot be used."""
        try:
            self._ensure_producer()
            self._connection.ensure_connection(max_retries=0)
        except Exception as exc:
            if not (self._is_outage(exc) or from_redis(exc)):
                raise
            raise self._unavailable(exc) from exc

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        failures = self._publish(rows)
        if self.sent_events.enabled:  # Celery's task-sent, when the app sends it: sent_events.py
            self.sent_events.send(self._producer, [row for row in rows if row.id not in failures])
        return failures

    def _publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        try:
            producer = self._ensure_producer()
            channel = redis_fast_path.redis_channel(self._connection, producer) if self.fast_path else None
            if channel is None:
                if kombu_path.kombu_redis_channel(producer) is not None:
                    return self._publish_kombu_redis(producer, rows)
                return self._publish_kombu(producer, rows)
            failures, rest = redis_fast_path.publish(
                producer,
                channel,
                rows,
                declared=self._declared,
                queues=self.app.amqp.queues,
                routes=self._routes,
                is_outage=self._is_outage,
            )
            if rest:
                failures.update(self._publish_kombu_redis(producer, rest))
            return failures
        except BrokerUnavailable:
            self.close()
            raise
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc

    def _publish_kombu(self, producer: Any, rows: Sequence[ClaimedRow]) -> dict[int, Exception]:
        """kombu's own publish batch: any transport but Redis."""
        return kombu_path.publish_each(producer, rows, self._declared, self.app.amqp.queues, self._is_outage)

    def _publish_kombu_redis(self, producer: Any, rows: Sequence[ClaimedRow]) -> dict[int, Exception]:
        """kombu's publish on Redis, each row's outcome known."""
        return kombu_path.publish_collected(
            producer, rows, self._declared, self.app.amqp.queues, self._is_outage
        )

    def locate(self, rows: Sequence[SentRow], *, take_over: bool) -> Mapping[int, str]:
        """Where these rows' messages are (the lost-message checks: ``lost.py``)."""
        try:
            producer = self._ensure_producer()
            channel = redis_fast_path.redis_channel(self._connection, producer) if self.fast_path else None
            return lost.locate(channel, rows, self._routes, take_over=take_over)
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> BrokerUnavailable:
        """Drop the broken connection; the error the relay treats as an outage."""
        self.close()
        return BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}")

    def _is_outage(self, exc: BaseException) -> bool:
        conn = self._connection
        return is_outage(exc, tuple(conn.connection_errors) if conn is not None else ())

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._declared.clear()
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("error closing the broker connection", exc_info=True)
