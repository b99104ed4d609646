"""The stamp: a message header saying "this message was staged by reliable-job".

Reliability belongs to the message, not to the configuration of whoever reads it. Staging adds
``reliable_job: 1`` to the message headers (through ``apply_async``'s ``headers`` option, which
Celery merges into the task message's headers), so the stored and relayed message carries it, and
completion in the worker follows it: a stamped message has a row to complete, an unstamped one has
none, whatever the worker thinks of the task.

On the worker a custom header is a key of the request dict, so it surfaces as
``task.request.reliable_job`` and in ``task.request.headers`` (Celery collects the headers it does
not know there). ``Task.retry`` republishes ``request.headers``, so a retry keeps the stamp; the
messages Celery publishes on a task's behalf (chain steps, ``link`` callbacks, chord bodies) are
new messages with headers of their own: they are stamped only if they are staged themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADER = "reliable_job"
"""The message header; also the attribute it becomes on the worker's ``task.request``."""
VALUE = 1
"""The stamp's value (a version of the stamp, should it ever need another)."""


def stamp(options: dict[str, Any]) -> None:
    """Add the stamp to ``apply_async``/``send_task`` ``options`` (a copy of any ``headers``
    given: the caller's dict may be shared, e.g. by every member of a group)."""
    headers = options.get("headers")
    options["headers"] = {**headers, HEADER: VALUE} if headers else {HEADER: VALUE}


def is_stamped(request: Any) -> bool:
    """True for a request whose message carries the stamp.

    ``request`` is a task's ``request`` (a Celery ``Context``), a worker ``Request`` (through its
    ``request_dict``) or the message headers themselves (a mapping).
    """
    if request is None:
        return False
    if isinstance(request, Mapping):
        return bool(request.get(HEADER))
    request_dict = getattr(request, "request_dict", None)
    if isinstance(request_dict, Mapping):
        return bool(request_dict.get(HEADER))
    if getattr(request, HEADER, None):
        return True
    headers = getattr(request, "headers", None)
    return isinstance(headers, Mapping) and bool(headers.get(HEADER))
