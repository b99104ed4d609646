"""Staging: which transaction a job is written in.

A job is written, in order of preference:

1. in the transaction explicitly bound for this call or block (:func:`bind`);
2. in the caller's current transaction, found through the configured session provider
   (``Settings.session``), when that session is inside a transaction;
3. otherwise in a short transaction of its own, committed at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from reliable_job import signals
from reliable_job.ports import OutboxWriter, StagedJob
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)

_bound: ContextVar[Any] = ContextVar("reliable_job_bound_target", default=None)

AdaptTarget = Callable[[Any, bool], "OutboxWriter | None"]
"""``adapt(target, explicit)``: the writer joining ``target``'s transaction, or ``None`` when an
implicit target has no transaction open (then the job gets a transaction of its own)."""


@contextmanager
def bind(target: Any) -> Iterator[None]:
    """Stage every reliable job enqueued in this block in ``target``'s transaction.

    ``target`` is a database session or connection (a SQLAlchemy ``Session`` or ``Connection``).
    The block does not commit anything: the jobs become real when the caller's transaction commits.
    """
    token = _bound.set(target)
    try:
        yield
    finally:
        _bound.reset(token)


class NotifyThrottle:
    """At most one relay wake-up (``NOTIFY``) per ``interval`` seconds from this process.

    A ``NOTIFY`` in every transaction would serialize commits (PostgreSQL takes a global lock to
    queue notifications at commit). Relays keep polling quickly for a while after a wake-up, so
    the jobs staged between two notifications are picked up without one.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def due(self) -> bool:
        """``True`` (and the clock restarts) when this transaction should notify."""
        now = self._clock()
        if now < self._next:
            return False
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self.interval
            return True

    def reset(self) -> None:
        """Start a fresh interval: the next transaction notifies."""
        with self._lock:
            self._next = float("-inf")


class Stager:
    """Resolves the transaction for each staged job and writes it there."""

    def __init__(
        self,
        settings: Settings,
        *,
        adapt: AdaptTarget,
        own_transaction: Callable[[], OutboxWriter],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._adapt = adapt
        self._own_transaction = own_transaction
        self._session_provider = settings.session
        self.notify_throttle = (
            NotifyThrottle(settings.notify_interval, clock) if settings.listen_notify else None
        )
        """The NOTIFY throttle of this process (``notify_interval``), ``None`` when wake-ups are off
        (``listen_notify``)."""

    def notify_due(self) -> bool:
        """Whether a writer should wake the relays in the transaction it writes to.

        Every :class:`~reliable_job.ports.OutboxWriter` on PostgreSQL calls it after inserting its
        rows and, when it returns ``True``, runs ``SELECT pg_notify(<channel>, '')`` in the same
        transaction, ``<channel>`` being :func:`reliable_job.schema.notify_channel` of the table.
        ``False`` when wake-ups are off (``listen_notify``) or were sent less than
        ``notify_interval`` ago.
        """
        return self.notify_throttle is not None and self.notify_throttle.due()

    def writer(self, target: Any = None) -> OutboxWriter:
        explicit = target if target is not None else _bound.get()
        if explicit is not None:
            writer = self._adapt(explicit, True)
            assert writer is not None
            return writer
        if self._session_provider is not None:
            implicit = self._session_provider()
            if implicit is not None:
                writer = self._adapt(implicit, False)
                if writer is not None:
                    return writer
        return self._own_transaction()

    def stage(self, jobs: Sequence[StagedJob], target: Any = None) -> None:
        self.writer(target).write(jobs)
        if signals.job_staged.receivers:  # in the caller's transaction: before it commits
            signals.job_staged.send(self, jobs=jobs)
        if logger.isEnabledFor(logging.DEBUG):
            for job in jobs:
                logger.debug(
                    "staged %s[%s]",
                    job.task_name,
                    job.job_id,
                    extra={"reliable_job.job_id": job.job_id},
                )


def conflicting_ids(jobs: Sequence[StagedJob], inserted: Iterable[str]) -> list[str]:
    """The ids of ``jobs`` the staging INSERT did not write (``inserted``: the ids its
    ``ON CONFLICT DO NOTHING ... RETURNING job_id`` returned): already in the outbox, or given
    twice in one call. Every writer raises :class:`~reliable_job.errors.DuplicateJobError` with
    them."""
    left = Counter(inserted)
    conflicts = []
    for job in jobs:
        if left[job.job_id] > 0:
            left[job.job_id] -= 1
        else:
            conflicts.append(job.job_id)
    return conflicts
