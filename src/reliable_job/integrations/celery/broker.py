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

Only a lost connection or a timeout is an outage (:func:`is_outage`: ``BrokerUnavailable``, the
relay keeps the whole batch pending). Anything the broker refuses for one row or one Redis key is
that row's failure, and every other row of the batch is published: a command error (``WRONGTYPE``
for a key of the wrong type, ``OOM`` under ``noeviction``, ``MISCONF``...) fails the rows pushed to
that key, or routed through that exchange's binding table; an unknown queue (``QueueNotFound``
with ``task_create_missing_queues`` off) or any other routing error fails its row; a message
routed to no queue at all, which kombu's Redis transport would silently drop (an exchange with no
binding for its routing key, as Celery's own publish would drop it), fails as
:class:`~reliable_job.errors.MessageUnroutable`. On Redis both paths run their pushes as one
pipeline executed once, without ``raise_on_error``: every command runs and reports its own
result, so the rows whose pushes succeeded are reported published, never pushed twice by a pass.
A row pushed to several keys fails if any of its pushes failed (its retry may then duplicate the
copies that were accepted: at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from kombu import Producer
from kombu.exceptions import InconsistencyError, OperationalError

from reliable_job.errors import BrokerUnavailable, MessageUnroutable
from reliable_job.integrations.celery.lost import delivery_tag, locate
from reliable_job.integrations.celery.message import (
    Route,
    publish_arguments,
    redis_parts,
    redis_parts_of_any,
    route_of,
)
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
            if not (self._is_outage(exc) or _from_redis(exc)):
                raise
            raise self._unavailable(exc) from exc

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        try:
            producer = self._ensure_producer()
            channel = self._redis_channel(producer)
            if channel is None:
                if self._kombu_redis_channel(producer) is not None:
                    return self._publish_kombu_redis(producer, rows)
                return self._publish_kombu(producer, rows)
            failures, rest = self._publish_redis(producer, channel, rows)
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
        """kombu's own publish, any transport but Redis (where kombu's batch would hide which
        row a refused command belonged to: :meth:`_publish_kombu_redis`)."""
        failures: dict[int, Exception] = {}
        with producer.batch(max_size=max(1, len(rows))):
            for row in rows:
                try:
                    self._publish_row(producer, row)
                except Exception as exc:
                    if self._is_outage(exc):
                        raise
                    failures[row.id] = exc  # QueueNotFound, a routing KeyError, a refusal
        return failures

    def _publish_row(self, producer: Any, row: ClaimedRow) -> None:
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

    def _kombu_redis_channel(self, producer: Any) -> Any:
        """The producer's channel when it is kombu's Redis channel (Sentinel included), else
        ``None``."""
        from kombu.transport import redis as kombu_redis

        channel = producer.channel
        if not isinstance(channel, kombu_redis.Channel) or not hasattr(producer, "_batch_local"):
            return None
        return channel

    def _publish_kombu_redis(self, producer: Any, rows: Sequence[ClaimedRow]) -> dict[int, Exception]:
        """kombu's publish on Redis, each row's outcome known: kombu routes every message (its
        exchange types, bindings, expiring queues, fanout) and hands its final Redis commands to
        a collector standing in for kombu's publish batch; the relay then runs them itself, in one
        pipeline without ``raise_on_error`` (kombu's batch would raise the first refused command
        after the others ran, for the whole batch). A message kombu routes nowhere (no command)
        would be dropped: :class:`MessageUnroutable`. Where Redis may retry pipelines
        (``retry_on_timeout``...), each command runs on its own, as kombu's unbatched publish does.
        """
        channel = self._kombu_redis_channel(producer)
        failures: dict[int, Exception] = {}
        planned: list[tuple[ClaimedRow, list[tuple[str, tuple[Any, ...]]]]] = []
        collector = _CommandCollector()
        producer._batch_local.current = collector
        try:
            for row in rows:
                collector.commands = []
                try:
                    self._publish_row(producer, row)
                except Exception as exc:
                    if self._is_outage(exc):
                        raise
                    failures[row.id] = exc
                    continue
                if not collector.commands:
                    failures[row.id] = _unroutable(row.message)
                    continue
                planned.append((row, collector.commands))
        finally:
            del producer._batch_local.current
        if not planned:
            return failures
        commands = [command for _, row_commands in planned for command in row_commands]
        with channel.conn_or_acquire() as client:
            if channel.supports_batch_publish:
                with client.pipeline(transaction=False) as pipe:
                    for name, args in commands:
                        getattr(pipe, name)(*args)
                    results = _execute(pipe)
            else:
                results = []
                for name, args in commands:
                    try:
                        results.append(getattr(client, name)(*args))
                    except Exception as exc:
                        if not self._is_outage(exc):
                            results.append(exc)
                            continue
                        if not any(_accepted(r) for r in results):
                            raise
                        # connection lost after some rows were accepted: report those published,
                        # fail the rest (never pushed twice by this pass)
                        results.extend([exc] * (len(commands) - len(results)))
                        break
        self._raise_if_nothing_accepted(results)
        outcomes = iter(results)
        for row, row_commands in planned:
            errors = [r for r in (next(outcomes) for _ in row_commands) if isinstance(r, Exception)]
            if errors:
                failures[row.id] = errors[0]
        return failures

    def _raise_if_nothing_accepted(self, results: Sequence[object]) -> None:
        """An outage answer (``READONLY``: a replica after failover) is the batch's outage only
        when Redis accepted none of its commands; otherwise the accepted rows are reported
        published and the others fail alone (never pushed twice by the same pass)."""
        if results and not any(_accepted(r) for r in results):
            first = results[0]
            if isinstance(first, Exception) and self._is_outage(first):
                raise first

    def locate(self, rows: Sequence[SentRow], *, take_over: bool) -> Mapping[int, str]:
        """Where these rows' messages are (the lost-message checks: ``lost.py``)."""
        try:
            return locate(self, rows, take_over=take_over)
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            raise self._unavailable(exc) from exc

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
        unreadable: dict[str, Exception] = {}
        names = sorted(direct)
        if names:
            with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                for exchange in names:
                    pipe.smembers(channel.keyprefix_queue % exchange)
                read = _execute(pipe)
            self._raise_if_nothing_accepted(read)
            for exchange, members in zip(names, read, strict=True):
                if isinstance(members, Exception):
                    unreadable[exchange] = members  # e.g. WRONGTYPE: that exchange's rows fail
                else:
                    tables[exchange] = [
                        tuple(_text(m).split(channel.sep)) for m in cast("set[bytes]", members)
                    ]

        pushes: dict[str, list[str]] = {}
        pushed: dict[str, list[int]] = {}
        lookups: dict[tuple[str, str], list[str] | None] = {}
        priorities: dict[int | None, int] = {}
        for row, route, head in planned:
            refusal = next((refused[n] for n in route.declare if n in refused), None)
            if refusal is None:
                refusal = unreadable.get(route.exchange)
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
                payload = f'{head}{delivery_tag(row.id, row.job_id, row.attempts + 1)}"}}}}'
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
                results = _execute(pipe)
            self._raise_if_nothing_accepted(results)
            for redis_key, result in zip(keys, results, strict=True):
                if isinstance(result, Exception):  # WRONGTYPE, OOM, MISCONF...: this key's rows
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


class _CommandCollector:
    """Stands in for kombu's Redis publish batch while the relay publishes through kombu.

    ``Producer._publish`` hands a message to the producer's current batch
    (``producer._batch_local.current.publish``); kombu's Redis channel then routes it and passes
    each final command (``LPUSH`` per queue, ``PEXPIRE`` for expiring queues, ``PUBLISH`` for
    fanout) to ``_publish_batch.add`` instead of running it. Here they are collected, so the relay
    knows which commands are which row's."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


def _execute(pipe: Any) -> list[object]:
    """Run a pipeline once (never retried: the fast path is only taken where Redis will not retry
    it), each command's error in its place. An exception from ``execute`` itself (connection lost,
    timeout, the connection's health check refused) means the pipeline could not run as a whole:
    the batch's outage, nothing reported published."""
    try:
        return list(pipe.execute(raise_on_error=False))
    except Exception as exc:
        raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from exc


def _from_redis(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is an error redis-py raised."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is installed with the celery extra
        return False
    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None:
            return False
        if isinstance(cause, RedisError):
            return True
        cause = cause.__cause__
    return False


def _accepted(result: object) -> bool:
    return not isinstance(result, Exception)


def _unroutable(text: str) -> MessageUnroutable:
    try:
        _, kwargs = publish_arguments(text)
        where = f"exchange {kwargs['exchange']!r} with routing key {kwargs['routing_key']!r}"
    except Exception:
        where = "its exchange and routing key"
    return MessageUnroutable(f"no queue is bound to {where}: the broker would drop the message")


def _error_classes() -> tuple[
    tuple[type[BaseException], ...], tuple[type[BaseException], ...], tuple[type[BaseException], ...]
]:
    """(always an outage, refusals, outages unless a refusal) exception classes."""
    outage: tuple[type[BaseException], ...] = ()
    refusal: tuple[type[BaseException], ...] = (KeyError, InconsistencyError)
    unreachable: tuple[type[BaseException], ...] = (OperationalError, OSError)
    try:
        from redis import exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is installed with the celery extra
        return outage, refusal, unreachable
    outage = (redis_errors.ReadOnlyError,)
    refusal = (*refusal, redis_errors.ResponseError, redis_errors.DataError)
    unreachable = (*unreachable, redis_errors.ConnectionError, redis_errors.TimeoutError)
    return outage, refusal, unreachable


def is_outage(exc: BaseException, connection_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``exc`` means the broker cannot be reached now (an outage: the relay keeps the whole
    batch pending and backs off) rather than a refusal of one row or one key (that row fails alone).

    Outage: a lost or refused connection or a timeout (redis-py's ``ConnectionError`` and
    ``TimeoutError`` with their subclasses: authentication, ``LOADING``; ``OSError``; kombu's
    ``OperationalError``; the transport's other ``connection_errors``), and ``READONLY`` (a
    replica after a failover: every write would fail).

    Refusal: a command error the server answered (redis ``ResponseError``: ``WRONGTYPE``,
    ``OOM``, ``MISCONF``, ``NOSCRIPT``...), a ``KeyError`` (Celery's ``QueueNotFound``, a routing
    lookup), kombu's ``InconsistencyError`` (no route), and anything else. kombu's Redis transport
    lists ``KeyError`` and ``InconsistencyError`` among its connection errors (for its consumer's
    poller) and ``ResponseError`` among its channel errors, so its two tuples cannot tell them
    apart: the classes are checked here, on the original error first (the deepest ``__cause__``:
    kombu raises ``BatchPublishError`` from the redis error that failed its batch).
    """
    outage, refusal, unreachable = _error_classes()
    unreachable = (*unreachable, *(t for t in connection_errors if not issubclass(t, refusal)))
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__
    for error in reversed(chain):
        if isinstance(error, outage):
            return True
        if isinstance(error, refusal):
            return False
        if isinstance(error, unreachable):
            return True
    return False


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
