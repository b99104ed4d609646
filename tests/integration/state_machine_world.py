"""The real things the state machine of ``test_state_machine.py`` drives: an outbox table on SQLite
or PostgreSQL, a Celery app with reliable-job installed on it, two queues in a real Redis under a
key prefix of their own, and an in-process "worker" that pops Redis messages and runs them through
Celery's own tracer (so chain steps and link callbacks are published as a worker would, and
completion hears ``task_success``), or drops them half way (a killed worker).

Nothing here decides what is right: the model in ``test_state_machine.py`` does.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from celery import Celery
from celery.app.trace import trace_task_ret
from kombu import Exchange, Queue
from sqlalchemy import Engine, MetaData, Table, select
from sqlalchemy.orm import Session

from reliable_job.integrations.celery import install
from reliable_job.integrations.celery.app import CeleryIntegration
from reliable_job.integrations.celery.broker import KombuBroker
from reliable_job.integrations.sqlalchemy import outbox_table
from reliable_job.ports import ClaimedRow
from reliable_job.relay import Relay

QUEUES = ("a", "b")
"""Two queues, so that a broker error on one queue's key can be seen not to stop the other."""


class RelayKilled(BaseException):
    """The relay process dies (SIGKILL) after the broker took a batch and before its COMMIT."""


def token_of_message(text: str) -> str | None:
    """The token (the job's only argument) in a stored outbox message or a Redis message."""
    try:
        doc = json.loads(text)
        payload = doc.get("payload", doc)
        args = json.loads(base64.b64decode(payload["body"]))[0]
        return str(args[0]) if args else None
    except Exception:
        return None


@dataclass
class Popped:
    """One Redis message taken by the worker."""

    job_id: str
    task: str
    token: str | None
    raw: bytes


class RecordingBroker:
    """The relay's broker (the real ``KombuBroker``), recording what each pass published and able
    to die between the publish and the claim's COMMIT."""

    def __init__(self, inner: KombuBroker, on_published: Callable[[list[ClaimedRow], bool], None]) -> None:
        self.inner = inner
        self.on_published = on_published
        self.kill_after_publish = False

    def connect(self) -> None:
        self.inner.connect()

    def publish(self, rows: Sequence[ClaimedRow]) -> Any:
        failures = self.inner.publish(rows)
        published = [row for row in rows if row.id not in failures]
        killed = self.kill_after_publish
        self.on_published(published, killed)
        if killed:
            raise RelayKilled()
        return failures

    def close(self) -> None:
        self.inner.close()


@dataclass
class World:
    """One database, one outbox table, one Celery app, one Redis key prefix: shared by every
    example of one test; :meth:`reset` empties them between examples."""

    engine: Engine
    redis_url: str
    settings: dict[str, Any]
    prefix: str = field(default_factory=lambda: f"rjsm{uuid.uuid4().hex[:8]}")
    runs: list[str] = field(default_factory=list)
    """Tokens of the task bodies that started, in order."""
    provider_session: Session | None = None
    """What the app's session provider returns (the "web request" session, or none in the worker)."""

    def __post_init__(self) -> None:
        self.table: Table = outbox_table(MetaData(), f"{self.prefix}_outbox")
        self.table.metadata.create_all(self.engine)
        self.redis = redis_lib.Redis.from_url(self.redis_url)
        self.app = self._make_app()
        self.runtime: CeleryIntegration = install(
            self.app,
            engine=self.engine,
            table_name=self.table.name,
            session=lambda: self.provider_session,
            relay_in_worker=False,
            listen_notify=False,
            **self.settings,
        )
        self.store = self.runtime.database.relay_stores()[0]

    # -- set-up --------------------------------------------------------------------------------

    def queue(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _make_app(self) -> Celery:
        app = Celery(f"{self.prefix}-app", set_as_current=False)
        queues = [
            Queue(self.queue(q), Exchange(self.queue(q), "direct"), routing_key=self.queue(q)) for q in QUEUES
        ]
        app.conf.update(
            broker_url=self.redis_url,
            task_queues=queues,
            task_default_queue=self.queue(QUEUES[0]),
            task_routes={f"sm.{q}": {"queue": self.queue(q)} for q in QUEUES},
            task_ignore_result=True,
            broker_connection_retry_on_startup=False,
        )
        runs = self.runs

        def body(token: str) -> str:
            runs.append(token)
            return token

        for q in QUEUES:
            app.task(name=f"sm.{q}", shared=False, reliable_job=True, ignore_result=True)(body)
        return app

    def task(self, queue: str) -> Any:
        return self.app.tasks[f"sm.{queue}"]

    def new_relay(
        self, on_published: Callable[[list[ClaimedRow], bool], None]
    ) -> tuple[Relay, RecordingBroker]:
        broker = RecordingBroker(KombuBroker(self.app), on_published)
        return Relay(self.store, broker, self.runtime.settings), broker

    # -- between examples and at the end -------------------------------------------------------

    def reset(self) -> None:
        self.runs.clear()
        self.provider_session = None
        self.drop_buffered()
        with self.engine.begin() as conn:
            conn.execute(self.table.delete())
        self.delete_keys()

    def close(self) -> None:
        self.drop_buffered()
        self.runtime.completion.stop_flusher()
        self.delete_keys()
        self.redis.close()
        self.runtime.database.close()
        self.table.metadata.drop_all(self.engine)

    # -- the outbox ----------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        t = self.table
        with self.engine.connect() as conn:
            result = conn.execute(
                select(t.c.id, t.c.job_id, t.c.state, t.c.message, t.c.last_error, t.c.attempts)
            )
            return [dict(r._mapping) for r in result]

    # -- completion ----------------------------------------------------------------------------

    def buffered(self) -> list[str]:
        return self.runtime.completion.pending()

    def drop_buffered(self) -> list[str]:
        """A worker killed outright: the ids its completion had gathered are gone."""
        completion = self.runtime.completion
        with completion._lock:
            dropped = list(completion._pending)
            completion._pending.clear()
        return dropped

    # -- Redis ---------------------------------------------------------------------------------

    def keys(self) -> list[bytes]:
        return list(self.redis.scan_iter(match=f"*{self.prefix}*", count=1000))

    def delete_keys(self) -> None:
        keys = self.keys()
        if keys:
            self.redis.delete(*keys)

    def queued(self, queue: str) -> list[bytes]:
        """The messages in a queue's list (oldest last, as kombu pushes them); none when the key
        is not a list."""
        key = self.queue(queue)
        if self.redis.type(key) != b"list":
            return []
        return list(self.redis.lrange(key, 0, -1))

    def pop(self, queue: str) -> Popped | None:
        """Take the oldest message of a queue, as kombu's Redis consumer does (BRPOP)."""
        key = self.queue(queue)
        if self.redis.type(key) != b"list":
            return None
        raw = self.redis.rpop(key)
        if raw is None:
            return None
        doc = json.loads(raw)
        return Popped(doc["headers"]["id"], doc["headers"]["task"], token_of_message(raw.decode()), raw)

    def run(self, popped: Popped) -> bool:
        """Run a message as a worker would: Celery's tracer (task body, then the chain's next step
        and link callbacks, then ``task_success``, which hands the id to completion); ``True``
        when the task succeeded."""
        doc = json.loads(popped.raw)
        props = doc["properties"]
        request = dict(doc["headers"])
        request.update(
            delivery_info=props.get("delivery_info"),
            reply_to=props.get("reply_to"),
            correlation_id=props.get("correlation_id"),
        )
        saved, self.provider_session = self.provider_session, None  # the worker's own context
        try:
            failed, _, _ = trace_task_ret(
                popped.task,
                popped.job_id,
                request,
                base64.b64decode(doc["body"]),
                doc["content-type"],
                doc["content-encoding"],
                app=self.app,
            )
        finally:
            self.provider_session = saved
        return not failed
