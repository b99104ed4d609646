"""PROVISIONAL (handoff-ids branch): the stamp a message staged by reliable-job carries.

The stamp-canvas branch owns this module; the integrator keeps its version. This one only gives
the hand-off code the agreed seam: ``HEADER``, ``stamp(options)`` and ``is_stamped(request)``.
"""

from __future__ import annotations

from typing import Any

HEADER = "reliable_job"
"""The message header that marks a job staged by reliable-job."""


def stamp(options: dict[str, Any]) -> None:
    """Mark the message ``send_task`` is about to build as staged by reliable-job."""
    headers = dict(options.get("headers") or {})
    headers[HEADER] = 1
    options["headers"] = headers


def is_stamped(request: Any) -> bool:
    """Whether the running task's message was staged by reliable-job.

    PROVISIONAL: falls back to the worker's configuration (``runtime.is_reliable``) when the
    header is absent; the stamp-canvas version follows the header alone.
    """
    if getattr(request, HEADER, None) or (getattr(request, "headers", None) or {}).get(HEADER):
        return True
    from celery._state import get_current_worker_task

    task = get_current_worker_task()
    if task is None or task.request is not request:
        return False
    runtime = getattr(task.app, "reliable_job", None)
    return bool(runtime is not None and runtime.is_reliable(task.name, task))
