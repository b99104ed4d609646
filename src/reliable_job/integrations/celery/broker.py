"""The relay's side of the broker: publishes stored messages through the app's broker connection.

On kombu's plain Redis transport (``redis://``, ``rediss://``) a batch takes a fast path: the
stored message already holds the finished Redis payload (``message.py``, envelope v2), so the relay
splices in a fresh delivery tag and pushes the bytes with one variadic ``LPUSH`` per queue key, in
one pipeline, after reading each exchange's binding table once per batch (kombu reads it for
every message). Redis ends up holding exactly what kombu's Redis transport would have put there:
same payload, same key (kombu's priority-queue naming included), same binding bookkeeping (queues
are declared through kombu, once per connection). Anything the fast path does not cover (other
exchange types, expiring queues, an unbound routing key, a non-default body encoding, Sentinel,
pipelines Redis may retry, other transports) goes through kombu's own publish batch.

A row the relay cannot read (corrupt JSON, a field of the wrong type, a format version newer than
this release reads) is that row's failure in the returned mapping, never an exception for the
batch: the rows around it are published. A stored envelope a tool re-serialized (other spacing or
key order) misses the fast path's slicing and is decoded and checked instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid

from reliable_job.errors import BrokerUnavailable
from reliable_job.integrations.celery.message import (
    Route,
    publish_arguments,
    redis_parts,
    redis_parts_of_any,
    route_of,
)
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
        self._routes: dict[str, Route] = {}
        """Parsed routing fields by their JSON text: most rows of a batch share a handful."""
        self.fast_path = True
        """Use the Redis fast path where it applies (tests turn it off to compare both paths)."""

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
        try:
            producer = self._ensure_producer()
            channel = self._redis_channel(producer)
            if channel is None:
                return self._publish_kombu(producer, rows)
            failures, rest = self._publish_redis(producer, channel, rows)
            if rest:
                failures.update(self._publish_kombu(producer, rest))
            return failures
        except BrokerUnavailable:
            raise
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc

    def _publish_kombu(self, producer: Any, rows: Sequence[ClaimedRow]) -> dict[int, Exception]:
        """kombu's own publish batch: one pipeline on Redis, any transport."""
        failures: dict[int, Exception] = {}
        with producer.batch(max_size=max(1, len(rows))):
            for row in rows:
                try:
                    body, kwargs = publish_arguments(row.message)
                    declare = self._to_declare(kwargs.pop("declare_names"))
                    producer.publish(
                        body,
                        declare=declare,
                        retry=False,
                        serializer=None,
                        compression=None,
                        **kwargs,
                    )
                    self._declared.update(queue.name for queue in declare)
                except Exception as exc:
                    if self._is_outage(exc):
                        raise
                    failures[row.id] = exc
        return failures

    # -- the Redis fast path -------------------------------------------------------------------

    def _redis_channel(self, producer: Any) -> Any:
        """The producer's channel when the fast path applies to this connection, else ``None``."""
        if not self.fast_path:
            return None
        from kombu.transport import redis as kombu_redis

        if type(self._connection.transport) is not kombu_redis.Transport:
            return None  # Sentinel and every other transport: kombu's path
        channel = producer.channel
        if (
            channel.body_encoding != "base64"
            or channel.default_priority != 0
            or not channel.supports_batch_publish
        ):
            return None
        return channel

    def _route(self, text: str) -> tuple[Route, str]:
        parts = redis_parts(text)
        if parts is None:
            return redis_parts_of_any(text)  # v1 rows staged by 0.1; corrupt rows raise
        route_json, head = parts
        route = self._routes.get(route_json)
        if route is None:
            if len(self._routes) > 1000:
                self._routes.clear()
            route = self._routes[route_json] = route_of(route_json)
        return route, head

    def _publish_redis(
        self, producer: Any, channel: Any, rows: Sequence[ClaimedRow]
    ) -> tuple[dict[int, Exception], list[ClaimedRow]]:
        """Push what the fast path covers; return the failures and the rows it leaves to kombu."""
        failures: dict[int, Exception] = {}
        rest: list[ClaimedRow] = []
        planned: list[tuple[ClaimedRow, Route, str]] = []
        for row in rows:
            try:
                route, head = self._route(row.message)
            except Exception as exc:  # CorruptMessage, UnknownMessageFormat: this row's failure
                failures[row.id] = exc  # the relay sets corrupt rows dead, defers newer formats
                continue
            planned.append((row, route, head))

        # Declare each queue once per connection, through kombu (bindings, exchange types).
        undeclared = {name for _, route, _ in planned for name in route.declare if name not in self._declared}
        refused: dict[str, Exception] = {}
        for name in sorted(undeclared):
            try:
                producer.maybe_declare(self.app.amqp.queues[name])
                self._declared.add(name)
            except Exception as exc:
                if self._is_outage(exc):
                    raise
                refused[name] = exc

        # Read each direct exchange's binding table once for the batch.
        exchanges = {route.exchange for _, route, _ in planned if route.exchange}
        direct = {e for e in exchanges if channel.typeof(e).type == "direct"}
        tables: dict[str, list[tuple[str, ...]]] = {}
        names = sorted(direct)
        if names:
            with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                for exchange in names:
                    pipe.smembers(channel.keyprefix_queue % exchange)
                for exchange, members in zip(names, pipe.execute(), strict=True):
                    tables[exchange] = [tuple(_text(m).split(channel.sep)) for m in members]

        pushes: dict[str, list[str]] = {}
        pushed: dict[str, list[int]] = {}
        lookups: dict[tuple[str, str], list[str] | None] = {}
        priorities: dict[int | None, int] = {}
        for row, route, head in planned:
            refusal = next((refused[n] for n in route.declare if n in refused), None)
            if refusal is not None:
                failures[row.id] = refusal
                continue
            try:
                key = (route.exchange, route.routing_key)
                if key not in lookups:
                    lookups[key] = self._lookup(channel, tables, *key)
                queues = lookups[key]
                if queues is None:
                    rest.append(row)
                    continue
                payload = f'{head}{uuid()}"}}}}'
                priority = priorities.get(route.priority)
                if priority is None:
                    priority = priorities[route.priority] = channel._get_message_priority(
                        {"properties": {"priority": route.priority or 0}}
                    )
                redis_keys = [channel._q_for_pri(queue, priority) for queue in queues]
            except Exception as exc:
                if self._is_outage(exc):
                    raise
                failures[row.id] = exc  # this row's routing, never the batch's
                continue
            for redis_key in redis_keys:
                pushes.setdefault(redis_key, []).append(payload)
                pushed.setdefault(redis_key, []).append(row.id)
        if pushes:
            keys = list(pushes)
            with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                for redis_key in keys:
                    pipe.lpush(redis_key, *pushes[redis_key])
                results = pipe.execute(raise_on_error=False)
            for redis_key, result in zip(keys, results, strict=True):
                if isinstance(result, Exception):
                    if self._is_outage(result):
                        raise result
                    for row_id in pushed[redis_key]:
                        failures[row_id] = result
        return failures, rest

    def _lookup(
        self,
        channel: Any,
        tables: Mapping[str, list[tuple[str, ...]]],
        exchange: str,
        routing_key: str,
    ) -> list[str] | None:
        """The queues kombu's direct routing picks, or ``None`` to leave the row to kombu."""
        if not exchange:
            queues = [routing_key] if routing_key else []
        elif exchange in tables:
            queues = sorted(channel.typeof(exchange).lookup(tables[exchange], exchange, routing_key, None))
        else:
            return None
        if not queues or any(queue in channel._expires for queue in queues):
            return None  # undeliverable (kombu warns) or expiring queues (kombu adds PEXPIRE)
        return queues

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


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
