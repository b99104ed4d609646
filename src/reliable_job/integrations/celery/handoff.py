"""Continuations of a staged job, handed off atomically when it finishes.

While a staged job's task runs in a worker, Celery publishes messages on its behalf: the next
step of a chain, ``link`` callbacks and ``link_error`` errbacks, a chord's body (published by the
last part to finish), and the replacement of ``Task.replace``. They are continuations of a durable
job, so they are staged whatever their task's own flag, and never through the user's session
provider (which may raise outside an application context, or hold a transaction the task body
left open and that is later rolled back). :func:`continuation_of` tells ``send_task`` that the
message it is publishing is one; it is then captured and held for the running task
(:func:`capture`), and when the task ends the worker's ``task_postrun`` handler writes what is
held and finishes the job's row in one transaction on the outbox database
(:meth:`~reliable_job.completion.Completion.hand_off`).

What counts as published on the job's behalf (the rest is staged as before):

- a message whose ``replaced_task_nesting`` is deeper than the running task's: ``Task.replace``;
- a message with an explicit ``parent_id`` equal to the running task's id: what Celery's tracer
  and result backend pass for chain steps, callbacks and errbacks;
- a message Celery publishes as a callback (``AMQP._retry_publish``, Celery >= 5.7): chord bodies.

A ``delay()``/``apply_async()`` in the task body is not a continuation: it joins the user's
session transaction (or one of its own) as anywhere else, and a call with
``reliable_job_session=`` goes to that session. Celery's retries (the running task's own id) are
published directly, as before.

Held messages belong to one task request (the :class:`celery.app.task.Context` on the task's
request stack): concurrent tasks of a threads pool never see each other's, and a prefork child
holds only its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reliable_job.integrations.celery.stamp import is_stamped
from reliable_job.ports import StagedJob

if TYPE_CHECKING:
    from reliable_job.integrations.celery.app import CeleryIntegration

logger = logging.getLogger(__name__)


@dataclass
class Held:
    """The continuations published so far on behalf of one running job."""

    job_id: str
    task_name: str
    jobs: list[StagedJob] = field(default_factory=list)


_lock = threading.Lock()
_held: dict[int, tuple[Any, Held]] = {}
"""By ``id(request)``; the request itself is kept alongside, so a reused id never matches."""


def continuation_of(runtime: CeleryIntegration, task_id: str | None, options: dict[str, Any]) -> Held | None:
    """The running staged job this message is published on behalf of, or ``None`` (staged or
    published as any other message)."""
    parent = runtime.app.current_worker_task
    if parent is None:
        return None
    request = parent.request
    if getattr(request, "is_eager", False) or not _on_behalf(request, task_id, options):
        return None
    if not is_stamped(request):
        return None
    key = id(request)
    with _lock:
        found = _held.get(key)
        if found is None or found[0] is not request:
            found = _held[key] = (request, Held(str(request.id), str(parent.name)))
        return found[1]


def _on_behalf(request: Any, task_id: str | None, options: dict[str, Any]) -> bool:
    nesting = options.get("replaced_task_nesting") or 0
    if nesting > (getattr(request, "replaced_task_nesting", 0) or 0):
        return True  # Task.replace: the replacement (its last step carries the job's id)
    if task_id is not None and task_id == request.id:
        return False  # a retry of the running job: published directly
    parent_id = options.get("parent_id")
    if parent_id is not None and parent_id == request.id:
        return True  # the tracer's chain step and callbacks, the backend's errbacks
    return _publishing_callback()


def _publishing_callback() -> bool:
    """Whether Celery is publishing a callback for the running task right now (chord bodies
    from the result backend): Celery >= 5.7 marks it with a context variable."""
    try:
        from celery.app.amqp import _callback_publish_retry
    except ImportError:  # pragma: no cover - Celery < 5.7
        return False
    return bool(_callback_publish_retry.get())


def release(request: Any) -> Held | None:
    """What is held for ``request`` (now forgotten), or ``None``."""
    with _lock:
        found = _held.pop(id(request), None)
    if found is None or found[0] is not request:
        return None
    return found[1]


def holds(request: Any) -> bool:
    """Whether continuations are held for ``request`` (its completion is the hand-off's)."""
    with _lock:
        found = _held.get(id(request))
    return found is not None and found[0] is request and bool(found[1].jobs)


def capture(
    runtime: CeleryIntegration,
    held: Held,
    name: str,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
) -> Any:
    """Prepare the message as ``send_task`` would publish it (stamped as staged), hold it for the
    running job, and return Celery's ``AsyncResult``."""
    result, job = runtime.capture(name, args, kwargs, options)
    held.jobs.append(job)
    logger.debug(
        "holding %s[%s] until job %s hands off",
        name,
        job.job_id,
        held.job_id,
        extra={"reliable_job.job_id": held.job_id},
    )
    return result
