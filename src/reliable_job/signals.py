"""Signals: hooks for users' own monitoring (and for the Prometheus metrics, one of their consumers).

A :class:`Signal` calls its receivers as ``receiver(sender, signal=<the signal>, **arguments)``;
receivers should accept ``**kwargs`` (arguments may be added). A receiver that raises is logged
(``reliable_job.signals``, with its traceback) and the others still run: a receiver never breaks
staging, the relay or completion. Receivers run in the thread that sends (a producer's request,
the relay's thread, a worker process): keep them short.

Sending costs one attribute check when nobody listens: the sending code tests
``signal.receivers`` (a tuple, empty when nothing is connected) before building arguments.
Per-row events are sent once per batch, with a list.

The signals, their arguments, and where they are sent:

- :data:`job_staged`: ``jobs`` (the :class:`~reliable_job.ports.StagedJob` written: ``task_name``,
  ``job_id``...). Sent after the rows are written **in the caller's transaction, before it
  commits**: a job whose transaction rolls back was signalled and never runs.
- :data:`job_published`: ``rows`` (the :class:`~reliable_job.ports.ClaimedRow` published by one
  relay pass: ``job_id``, ``message``, ``attempts``), sent after the pass committed. The task name
  is in the stored message (for Celery:
  :func:`reliable_job.integrations.celery.decoding.task_name_of`); decoding it is left to the
  receivers that want it, so the relay does not pay for it.
- :data:`job_publish_failed`: ``failures`` (``(row, error)`` pairs, rows the broker refused in one
  pass; retried with backoff, or dead after ``max_publish_attempts``) and ``error`` (text: the
  first row's error, or the broker outage that failed a whole pass, then ``failures`` is empty).
- :data:`job_dead`: ``reason`` (``"publish"``: could not be published after
  ``max_publish_attempts``; ``"final_failure"``: the task failed for good and its row was buried,
  ``preserve_dead_jobs``; ``"never_completed"``: delivered ``max_publish_attempts`` times without
  completing), ``count``, ``job_ids`` (a list, or ``None`` where the store reports counts only).
- :data:`job_redelivered`: ``count`` and ``reason`` (``"lost"``: the loss check found the
  message gone from the broker; ``"redeliver_after"``: the backstop), rows put back to pending.
- :data:`job_completed`: ``outcome`` (``"succeeded"``, ``"failed"``, ``"revoked"``,
  ``"expired"``, ``"rejected"``) and ``job_ids``, sent in the worker process when the task's
  outcome is reported (the row's delete may be batched, ``completion_interval``).
- :data:`relay_pass`: ``duration`` (seconds), ``published`` (rows published) and ``handled``
  (rows claimed), after every relay pass, empty ones included.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

Receiver = Callable[..., object]


class Signal:
    """A named event with receivers (see the module's docstring)."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc or f"The {name} signal."
        self._lock = threading.RLock()  # a weak receiver's death may drop it while held
        self._refs: dict[object, Callable[[], Receiver | None]] = {}
        self.receivers: tuple[Callable[[], Receiver | None], ...] = ()
        """References to the connected receivers (call one: its receiver, ``None`` once a weak
        one is gone); empty when none. Replaced, never mutated: sending reads it without a lock,
        and the hot paths test it before building a signal's arguments."""

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self.receivers)} receiver(s)>"

    def __bool__(self) -> bool:
        return bool(self.receivers)

    def connect(self, receiver: Receiver, *, weak: bool = True) -> Receiver:
        """Call ``receiver(sender, signal=self, **arguments)`` on every send; returns it (so this
        works as a decorator). With ``weak`` (the default, as Django's and Celery's signals) the
        signal holds a weak reference: a receiver nobody else keeps (a lambda, a local function)
        is dropped with it; pass ``weak=False`` for those. Connecting twice is a no-op."""
        key = _key(receiver)
        ref: Callable[[], Receiver | None]
        if not weak:
            ref = _Strong(receiver)
        elif hasattr(receiver, "__self__") and hasattr(receiver, "__func__"):
            ref = weakref.WeakMethod(receiver, lambda _ref: self._drop(key))
        else:
            ref = weakref.ref(receiver, lambda _ref: self._drop(key))
        with self._lock:
            if key not in self._refs:
                self._refs[key] = ref
                self._rebuild()
        return receiver

    def disconnect(self, receiver: Receiver) -> bool:
        """Stop calling ``receiver``; ``False`` when it was not connected."""
        with self._lock:
            found = self._refs.pop(_key(receiver), None) is not None
            if found:
                self._rebuild()
        return found

    def send(self, sender: object, **arguments: Any) -> None:
        """Call every receiver; one that raises is logged and the others still run."""
        for ref in self.receivers:
            receiver = ref()
            if receiver is None:
                continue
            try:
                receiver(sender, signal=self, **arguments)
            except Exception:
                logger.exception("a receiver of reliable-job's %s signal raised; ignored", self.name)

    def _drop(self, key: object) -> None:
        with self._lock:
            if self._refs.pop(key, None) is not None:
                self._rebuild()

    def _rebuild(self) -> None:
        self.receivers = tuple(self._refs.values())


class _Strong:
    __slots__ = ("receiver",)

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def __call__(self) -> Receiver:
        return self.receiver


def _key(receiver: Receiver) -> object:
    """Bound methods are made anew on each attribute access: key them by object and function."""
    owner = getattr(receiver, "__self__", None)
    function = getattr(receiver, "__func__", None)
    if owner is not None and function is not None:
        return (id(owner), id(function))
    return id(receiver)


job_staged = Signal("job_staged", "Jobs written to the outbox, in the caller's transaction (before commit).")
job_published = Signal("job_published", "Rows a relay pass published (after its commit).")
job_publish_failed = Signal("job_publish_failed", "Rows the broker refused in a relay pass, or an outage.")
job_dead = Signal("job_dead", "Rows set dead: reason publish, final_failure or never_completed.")
job_redelivered = Signal("job_redelivered", "Published rows put back to pending (lost, or backstop).")
job_completed = Signal("job_completed", "A worker reported a staged job's outcome.")
relay_pass = Signal("relay_pass", "A relay pass ended: its duration and how many rows it published.")

ALL: tuple[Signal, ...] = (
    job_staged,
    job_published,
    job_publish_failed,
    job_dead,
    job_redelivered,
    job_completed,
    relay_pass,
)
