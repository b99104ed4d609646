"""The relay's Redis fast path: stored payloads pushed as they are, one pipeline per batch.

On kombu's plain Redis transport the stored message already holds the finished Redis payload
(``message.py``, envelope v2): the relay splices in a fresh delivery tag and pushes the bytes with
one variadic ``LPUSH`` per queue key, in one pipeline, after reading each exchange's binding table
once per batch (kombu reads it for every message). Redis ends up holding exactly what kombu's Redis
transport would have put there: same payload, same key (kombu's priority-queue naming included),
same binding bookkeeping (queues are declared through kombu, once per connection). A row the fast
path does not cover (other exchange types, expiring queues, an unbound routing key) is left to
kombu's path (``kombu_path.py``); so is a whole connection it does not apply to
(:func:`redis_channel`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from reliable_job.integrations.celery.decoding import Route, redis_parts_of_any, route_of
from reliable_job.integrations.celery.message import redis_parts
from reliable_job.integrations.celery.refusals import execute, raise_if_nothing_accepted
from reliable_job.ports import ClaimedRow

IsOutage = Callable[[BaseException], bool]

TAG_PREFIX = "rj."
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}\Z")
Planned = list[tuple[ClaimedRow, Route, str]]


def delivery_tag(row_id: int, job_id: str, publication: int) -> str:
    """The delivery tag of a row's ``publication``-th publication (its ``attempts`` once marked
    sent): unique per row and publication, plain text that needs no JSON escaping (a job id with
    other characters is replaced by a digest of it)."""
    if not _PLAIN_ID.match(job_id):
        job_id = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32]
    return f"{TAG_PREFIX}{row_id}.{publication}.{job_id}"


def redis_channel(connection: Any, producer: Any) -> Any:
    """The producer's channel when the fast path applies to this connection, else ``None``."""
    from kombu.transport import redis as kombu_redis

    if type(connection.transport) is not kombu_redis.Transport:
        return None  # Sentinel and every other transport: kombu's path
    channel = producer.channel
    if (
        channel.body_encoding != "base64"
        or channel.default_priority != 0
        or not channel.supports_batch_publish
    ):
        return None
    return channel


def publish(
    producer: Any,
    channel: Any,
    rows: Sequence[ClaimedRow],
    *,
    declared: set[str],
    queues: Mapping[str, Any],
    routes: dict[str, Route],
    is_outage: IsOutage,
) -> tuple[dict[int, Exception], list[ClaimedRow]]:
    """Push what the fast path covers; return the failures and the rows it leaves to kombu.

    ``declared`` holds the queues declared on this connection (updated here), ``routes`` the
    parsed routing fields by their JSON text (most rows of a batch share a handful)."""
    failures: dict[int, Exception] = {}
    rest: list[ClaimedRow] = []
    planned: Planned = []
    for row in rows:
        try:
            route, head = route_and_head(row.message, routes)
        except Exception as exc:  # CorruptMessage, UnknownMessageFormat: this row's failure
            failures[row.id] = exc  # the relay sets corrupt rows dead, defers newer formats
            continue
        planned.append((row, route, head))

    refused = _declare(producer, planned, declared, queues, is_outage)
    tables, unreadable = _read_bindings(channel, planned, is_outage)

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
                lookups[key] = lookup(channel, tables, *key)
            queue_names = lookups[key]
            if queue_names is None:
                rest.append(row)
                continue
            payload = f'{head}{delivery_tag(row.id, row.job_id, row.attempts + 1)}"}}}}'
            priority = priorities.get(route.priority)
            if priority is None:
                priority = priorities[route.priority] = channel._get_message_priority(
                    {"properties": {"priority": route.priority or 0}}
                )
            redis_keys = [channel._q_for_pri(queue, priority) for queue in queue_names]
        except Exception as exc:
            if is_outage(exc):
                raise
            failures[row.id] = exc  # this row's routing, never the batch's
            continue
        for redis_key in redis_keys:
            pushes.setdefault(redis_key, []).append(payload)
            pushed.setdefault(redis_key, []).append(row.id)
    if pushes:
        _push(channel, pushes, pushed, failures, is_outage)
    return failures, rest


def route_and_head(text: str, routes: dict[str, Route]) -> tuple[Route, str]:
    """A stored message's route and Redis payload head (sliced from a v2 envelope, else decoded);
    parsed routes are cached in ``routes`` by their JSON text."""
    parts = redis_parts(text)
    if parts is None:
        return redis_parts_of_any(text)  # v1 rows staged by 0.1; corrupt rows raise
    route_json, head = parts
    route = routes.get(route_json)
    if route is None:
        if len(routes) > 1000:
            routes.clear()
        route = routes[route_json] = route_of(route_json)
    return route, head


def _declare(
    producer: Any,
    planned: Planned,
    declared: set[str],
    queues: Mapping[str, Any],
    is_outage: IsOutage,
) -> dict[str, Exception]:
    """Declare each queue once per connection, through kombu (bindings, exchange types); return
    the queues the broker refused to declare, with their errors."""
    undeclared = {name for _, route, _ in planned for name in route.declare if name not in declared}
    refused: dict[str, Exception] = {}
    for name in sorted(undeclared):
        try:
            producer.maybe_declare(queues[name])
            declared.add(name)
        except Exception as exc:
            if is_outage(exc):
                raise
            refused[name] = exc
    return refused


def _read_bindings(
    channel: Any, planned: Planned, is_outage: IsOutage
) -> tuple[dict[str, list[tuple[str, ...]]], dict[str, Exception]]:
    """Read each direct exchange's binding table once for the batch: the tables, and the
    exchanges whose table could not be read (e.g. ``WRONGTYPE``: that exchange's rows fail)."""
    exchanges = {route.exchange for _, route, _ in planned if route.exchange}
    direct = {e for e in exchanges if channel.typeof(e).type == "direct"}
    tables: dict[str, list[tuple[str, ...]]] = {}
    unreadable: dict[str, Exception] = {}
    names = sorted(direct)
    if names:
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for exchange in names:
                pipe.smembers(channel.keyprefix_queue % exchange)
            read = execute(pipe)
        raise_if_nothing_accepted(read, is_outage)
        for exchange, members in zip(names, read, strict=True):
            if isinstance(members, Exception):
                unreadable[exchange] = members
            else:
                tables[exchange] = [tuple(_text(m).split(channel.sep)) for m in cast("set[bytes]", members)]
    return tables, unreadable


def lookup(
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


def _push(
    channel: Any,
    pushes: Mapping[str, list[str]],
    pushed: Mapping[str, list[int]],
    failures: dict[int, Exception],
    is_outage: IsOutage,
) -> None:
    """One variadic ``LPUSH`` per Redis key, in one pipeline; a refused key fails its rows."""
    keys = list(pushes)
    with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
        for redis_key in keys:
            pipe.lpush(redis_key, *pushes[redis_key])
        results = execute(pipe)
    raise_if_nothing_accepted(results, is_outage)
    for redis_key, result in zip(keys, results, strict=True):
        if isinstance(result, Exception):  # WRONGTYPE, OOM, MISCONF...: this key's rows
            for row_id in pushed[redis_key]:
                failures[row_id] = result


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
