"""Publishing stored messages through kombu's own ``Producer.publish``: every transport, and on
Redis every message the fast path (``redis_fast_path.py``) does not cover.

kombu routes each message (its exchange types, bindings, expiring queues, fanout). On Redis its
final commands are collected per row rather than left to kombu's publish batch, which would raise
the first refused command after the others ran, for the whole batch: the relay runs them itself,
so each row's outcome is known (``refusals.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reliable_job.integrations.celery.decoding import publish_arguments
from reliable_job.integrations.celery.refusals import (
    accepted,
    execute,
    raise_if_nothing_accepted,
    unroutable,
)
from reliable_job.ports import ClaimedRow

IsOutage = Callable[[BaseException], bool]


def publish_each(
    producer: Any,
    rows: Sequence[ClaimedRow],
    declared: set[str],
    queues: Mapping[str, Any],
    is_outage: IsOutage,
) -> dict[int, Exception]:
    """kombu's own publish, any transport but Redis (where kombu's batch would hide which
    row a refused command belonged to: :func:`publish_collected`)."""
    failures: dict[int, Exception] = {}
    with producer.batch(max_size=max(1, len(rows))):
        for row in rows:
            try:
                _publish_row(producer, row, declared, queues)
            except Exception as exc:
                if is_outage(exc):
                    raise
                failures[row.id] = exc  # QueueNotFound, a routing KeyError, a refusal
    return failures


def _publish_row(producer: Any, row: ClaimedRow, declared: set[str], queues: Mapping[str, Any]) -> None:
    body, kwargs = publish_arguments(row.message)
    declare = [queues[name] for name in kwargs.pop("declare_names") if name not in declared]
    producer.publish(
        body,
        declare=declare,
        retry=False,
        serializer=None,
        compression=None,
        **kwargs,
    )
    declared.update(queue.name for queue in declare)


def kombu_redis_channel(producer: Any) -> Any:
    """The producer's channel when it is kombu's Redis channel (Sentinel included), else
    ``None``."""
    from kombu.transport import redis as kombu_redis

    channel = producer.channel
    if not isinstance(channel, kombu_redis.Channel) or not hasattr(producer, "_batch_local"):
        return None
    return channel


def publish_collected(
    producer: Any,
    rows: Sequence[ClaimedRow],
    declared: set[str],
    queues: Mapping[str, Any],
    is_outage: IsOutage,
) -> dict[int, Exception]:
    """kombu's publish on Redis, each row's outcome known: kombu routes every message (its
    exchange types, bindings, expiring queues, fanout) and hands its final Redis commands to
    a collector standing in for kombu's publish batch; the relay then runs them itself, in one
    pipeline without ``raise_on_error`` (kombu's batch would raise the first refused command
    after the others ran, for the whole batch). A message kombu routes nowhere (no command)
    would be dropped: :class:`~reliable_job.errors.MessageUnroutable`. Where Redis may retry
    pipelines (``retry_on_timeout``...), each command runs on its own, as kombu's unbatched
    publish does.
    """
    channel = kombu_redis_channel(producer)
    failures: dict[int, Exception] = {}
    planned: list[tuple[ClaimedRow, list[tuple[str, tuple[Any, ...]]]]] = []
    collector = _CommandCollector()
    producer._batch_local.current = collector
    try:
        for row in rows:
            collector.commands = []
            try:
                _publish_row(producer, row, declared, queues)
            except Exception as exc:
                if is_outage(exc):
                    raise
                failures[row.id] = exc
                continue
            if not collector.commands:
                failures[row.id] = unroutable(row.message)
                continue
            planned.append((row, collector.commands))
    finally:
        del producer._batch_local.current
    if not planned:
        return failures
    commands = [command for _, row_commands in planned for command in row_commands]
    results = _run(channel, commands, is_outage)
    raise_if_nothing_accepted(results, is_outage)
    outcomes = iter(results)
    for row, row_commands in planned:
        errors = [r for r in (next(outcomes) for _ in row_commands) if isinstance(r, Exception)]
        if errors:
            failures[row.id] = errors[0]
    return failures


def _run(channel: Any, commands: list[tuple[str, tuple[Any, ...]]], is_outage: IsOutage) -> list[object]:
    """Each command's result or error, in order: one pipeline, or one command at a time where
    Redis may retry pipelines."""
    with channel.conn_or_acquire() as client:
        if channel.supports_batch_publish:
            with client.pipeline(transaction=False) as pipe:
                for name, args in commands:
                    getattr(pipe, name)(*args)
                return execute(pipe)
        results: list[object] = []
        for name, args in commands:
            try:
                results.append(getattr(client, name)(*args))
            except Exception as exc:
                if not is_outage(exc):
                    results.append(exc)
                    continue
                if not any(accepted(r) for r in results):
                    raise
                # connection lost after some rows were accepted: report those published,
                # fail the rest (never pushed twice by this pass)
                results.extend([exc] * (len(commands) - len(results)))
                break
        return results


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
