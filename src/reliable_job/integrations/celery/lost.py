"""Where a published job's message is on Redis: queued, held by a worker, started, or nowhere.

The relay's Redis fast path publishes every message with a delivery tag derived from its row
(:func:`delivery_tag`: the row id, its publication number and its job id), so the relay can find
its own messages again without storing anything new:

- **queued**: the exact bytes it pushed are still in the queue's list (``LPOS`` from the oldest
  end, where a message published a while ago sits; a message kombu restored is found in its
  restored form, with ``redelivered`` set);
- **held**: the tag is in kombu's ``unacked`` hash: a worker prefetched it, or runs it with
  ``acks_late``; if that worker dies, kombu restores it after ``visibility_timeout``;
- **started**: a worker started the job (:func:`mark_started`, written by the worker's
  ``task_prerun`` for reliable tasks: with Celery's default early acknowledgement the message
  leaves ``unacked`` as the job starts). The marker lives ``redeliver_after`` while the job runs and
  a short while after it ends (:func:`mark_finished`), so that its row is deleted first. Markers
  are written off the task's path, a few milliseconds late and in order, by a thread of the
  worker process (:mod:`~reliable_job.integrations.celery.markers`): the loss check looks only at
  rows published ``lost_check_after`` ago and wants a message missing at two checks in a row.

With ``take_over`` (the ``redeliver_after`` backstop), a held message is removed from ``unacked``
and its index by the relay (``HDEL``: kombu's restore runs in a transaction that ``WATCH``\\ es
that hash, so exactly one of them gets it) and reported taken: the relay publishes it again and
kombu never restores it. A message kombu restored first is reported held (it is queued again).

Only rows the fast path itself publishes can be found: other transports, kombu's own publish
(other exchange types, expiring queues), Sentinel and a ``global_keyprefix`` report unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, cast

from kombu.utils.json import dumps, loads
from redis.exceptions import ResponseError

from reliable_job.integrations.celery import markers
from reliable_job.integrations.celery.decoding import Route
from reliable_job.integrations.celery.redis_fast_path import delivery_tag, lookup, route_and_head
from reliable_job.ports import SentRow, Whereabouts

logger = logging.getLogger(__name__)

STARTED_PREFIX = "reliable_job.started."
"""Redis key prefix of the started markers (followed by the job id)."""
FINISHED_TTL = 120
"""Least seconds a started marker outlives its job (the job's row is deleted meanwhile)."""


def locate(
    channel: Any, rows: Sequence[SentRow], routes: dict[str, Route], *, take_over: bool
) -> dict[int, str]:
    """:meth:`~reliable_job.ports.MessageLocator.locate` on the relay's Redis ``channel`` (the fast
    path's, or ``None`` where it does not apply: every row unknown); ``routes`` is the broker's
    cache of parsed routing fields."""
    found = {row.id: Whereabouts.UNKNOWN for row in rows}
    if channel is None or bool(getattr(channel, "global_keyprefix", None)):
        return found
    plans = _plans(channel, rows, routes)
    if not plans:
        return found
    unacked = channel.unacked_key
    with channel.conn_or_acquire() as client:
        # 1. held and started, in one atomic snapshot
        with client.pipeline(transaction=True) as pipe:
            for row, tag, _, _ in plans:
                pipe.hexists(unacked, tag)
                pipe.exists(STARTED_PREFIX + row.job_id)
            first = pipe.execute()
        rest: list[tuple[SentRow, str, list[str], str]] = []
        held: list[tuple[SentRow, str]] = []
        for index, (row, tag, keys, payload) in enumerate(plans):
            if first[2 * index]:
                held.append((row, tag))
                found[row.id] = Whereabouts.HELD
            elif first[2 * index + 1] and not take_over:
                found[row.id] = Whereabouts.STARTED
            else:
                rest.append((row, tag, keys, payload))
        # 2. still queued: the exact bytes pushed, or kombu's restored form
        if rest:
            with client.pipeline(transaction=False) as pipe:
                for _, _, keys, payload in rest:
                    restored = _restored(payload)
                    for key in keys:
                        pipe.lpos(key, payload, rank=-1)
                        pipe.lpos(key, restored, rank=-1)
                positions = iter(pipe.execute(raise_on_error=False))
            for row, _, keys, _ in rest:
                answers = [next(positions) for _ in range(2 * len(keys))]
                if any(isinstance(a, Exception) for a in answers):
                    continue  # a server without LPOS (Redis < 6.0.6): unknown
                found[row.id] = (
                    Whereabouts.QUEUED if any(a is not None for a in answers) else Whereabouts.MISSING
                )
        # 3. the backstop takes held messages from kombu (or finds kombu restored them first)
        if take_over and held:
            with client.pipeline(transaction=True) as pipe:
                for _, tag in held:
                    pipe.zrem(channel.unacked_index_key, tag)
                    pipe.hdel(unacked, tag)
                removed = pipe.execute()
            for index, (row, _) in enumerate(held):
                if removed[2 * index + 1]:
                    found[row.id] = Whereabouts.TAKEN
    return found


def _plans(
    channel: Any, rows: Sequence[SentRow], routes: dict[str, Route]
) -> list[tuple[SentRow, str, list[str], str]]:
    """For each row the fast path would have pushed: (row, its tag, its Redis keys, the bytes)."""
    routed = []
    for row in rows:
        try:
            route, head = route_and_head(row.message, routes)
        except Exception:  # corrupt or newer: not published by this relay
            logger.debug("row %d: message unreadable, whereabouts unknown", row.id, exc_info=True)
            continue
        routed.append((row, route, head))
    direct = sorted({route.exchange for _, route, _ in routed if route.exchange})
    tables: dict[str, list[tuple[str, ...]]] = {}
    for exchange in direct:
        try:
            if channel.typeof(exchange).type != "direct":
                continue
            members = channel.client.smembers(channel.keyprefix_queue % exchange)
        except ResponseError:  # WRONGTYPE...: that exchange's rows are unknown
            logger.debug("binding table of %r unreadable", exchange, exc_info=True)
            continue
        tables[exchange] = [tuple(_text(m).split(channel.sep)) for m in cast("set[bytes]", members)]
    plans = []
    for row, route, head in routed:
        try:
            queues = lookup(channel, tables, route.exchange, route.routing_key)
            if queues is None:
                continue  # kombu's own publish: its tag is kombu's
            priority = channel._get_message_priority({"properties": {"priority": route.priority or 0}})
            keys = [channel._q_for_pri(queue, priority) for queue in queues]
        except Exception:  # a routing error: the row was not published by the fast path
            logger.debug("row %d: no route, whereabouts unknown", row.id, exc_info=True)
            continue
        tag = delivery_tag(row.id, row.job_id, row.attempts)
        plans.append((row, tag, keys, f'{head}{tag}"}}}}'))
    return plans


def _restored(payload: str) -> str:
    """The message as kombu puts it back when it restores it (``_do_restore_message``)."""
    message = loads(payload)
    try:
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
    return cast("str", dumps(message))


# -- the worker's started markers -------------------------------------------------------------

_clients: dict[int, Any] = {}
"""A Redis client per process id (a prefork child makes its own), or ``None`` off Redis."""


def _client(app: Any) -> Any:
    pid = os.getpid()
    if pid not in _clients:
        client = None
        try:
            from kombu.transport import redis as kombu_redis

            connection = app.connection_for_write()
            channel = connection.default_channel
            if isinstance(channel, kombu_redis.Channel) and not getattr(channel, "global_keyprefix", ""):
                client = channel.client
        except Exception:
            logger.debug("no Redis client for started markers", exc_info=True)
        _clients.clear()
        _clients[pid] = client
    return _clients[pid]


def mark_started(app: Any, job_id: str, ttl: float) -> None:
    """Record that ``job_id`` started (``ttl`` seconds): the loss check leaves it alone. Written
    a few milliseconds later by this process's marker writer, in order
    (:mod:`~reliable_job.integrations.celery.markers` says why that is safe)."""
    client = _client(app)
    if client is None:
        return
    markers.writer.add(client, markers.SET, STARTED_PREFIX + job_id, max(1, int(ttl)))


def mark_finished(app: Any, job_id: str, ttl: float) -> None:
    """Shorten the marker of a job that ended to ``ttl`` seconds (its row goes meanwhile);
    written after its :func:`mark_started`, through the same writer."""
    client = _client(app)
    if client is None:
        return
    markers.writer.add(client, markers.EXPIRE, STARTED_PREFIX + job_id, max(1, int(ttl)))


def marker_ttls(redeliver_after: float, lost_check_after: float) -> tuple[float, float]:
    """(while running, after the end): a running job is marked for ``redeliver_after`` (a day when
    redelivery is off), an ended one for at least :data:`FINISHED_TTL` seconds."""
    running = redeliver_after if redeliver_after > 0 else 86400.0
    return max(running, lost_check_after * 2), max(float(FINISHED_TTL), lost_check_after * 2)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
