"""Celery's ``task-sent`` monitoring event, sent by the relay for the jobs it published.

Celery's own publish (``app.amqp.send_task_message``) sends ``task-sent`` after the message when
the app has ``task_send_sent_event`` on. At staging that publish runs with a capturing producer
(``capture.py``), which keeps the task message and drops the event: the job is not on the broker
yet. The relay sends it instead, once the job's message is published, so monitors that count sent
tasks (Flower, ``celery events``) see every staged job, when it reaches the broker.

Cheap per batch: nothing at all unless ``task_send_sent_event`` is on; then one dispatcher per
relay (Celery's ``Dispatcher``, disabled: it only prepares events, as Celery's default one does),
each published row's stored envelope decoded once for its headers, and the batch's events sent
through the relay's producer in one kombu publish batch (one Redis pipeline). The fields are the
ones Celery's message protocol 2 sends: ``uuid, root_id, parent_id, name, args, kwargs, retries,
eta, expires, queue, exchange, routing_key`` (``args``/``kwargs`` are the message's
``argsrepr``/``kwargsrepr`` headers). An event that cannot be sent is logged, never a failure of
the batch: the jobs are published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from reliable_job.ports import ClaimedRow

logger = logging.getLogger(__name__)

EVENT = "task-sent"


class SentEvents:
    """Sends ``task-sent`` for the rows one relay published (one per :class:`KombuBroker`)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._dispatcher: Any = None

    @property
    def enabled(self) -> bool:
        """Whether the app sends ``task-sent`` events (``task_send_sent_event``)."""
        return bool(self.app.conf.task_send_sent_event)

    def send(self, producer: Any, rows: Sequence[ClaimedRow]) -> int:
        """One ``task-sent`` event per row (published just now through ``producer``); returns how
        many were handed to the broker."""
        if not rows:
            return 0
        sent = 0
        try:
            dispatcher = self._dispatcher_for(producer)
            with producer.batch(max_size=len(rows)):
                for row in rows:
                    fields = event_fields(row)
                    if fields is None:
                        continue
                    dispatcher.publish(EVENT, fields, producer)
                    sent += 1
        except Exception as exc:
            logger.warning(
                "could not send the task-sent events of %d published jobs: %s: %s",
                len(rows),
                type(exc).__name__,
                exc,
            )
            return 0
        return sent

    def _dispatcher_for(self, producer: Any) -> Any:
        if self._dispatcher is None:
            # disabled: it prepares events (hostname, clock, exchange); the relay's producer
            # publishes them, as Celery's own send_task_message does with its default dispatcher
            self._dispatcher = self.app.events.Dispatcher(producer.connection, enabled=False)
        return self._dispatcher


def event_fields(row: ClaimedRow) -> dict[str, object] | None:
    """The ``task-sent`` fields of a stored message (v1 or v2 envelope), or ``None`` when the row
    cannot be read (it was published as stored: that is the broker adapter's business)."""
    try:
        doc = json.loads(row.message)
        payload = doc["payload"] if doc.get("v") == 2 else doc
        headers = payload["headers"]
        declare = doc.get("declare") or ()
        routing_key = doc.get("routing_key")
        return {
            "uuid": headers.get("id") or row.job_id,
            "root_id": headers.get("root_id"),
            "parent_id": headers.get("parent_id"),
            "name": headers.get("task"),
            "args": headers.get("argsrepr"),
            "kwargs": headers.get("kwargsrepr"),
            "retries": headers.get("retries"),
            "eta": headers.get("eta"),
            "expires": headers.get("expires"),
            "queue": declare[0] if declare else routing_key,
            "exchange": doc.get("exchange"),
            "routing_key": routing_key,
        }
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        logger.debug("no task-sent event for job %s: unreadable message", row.job_id)
        return None
