"""Completion: what happens to a job's row once the worker is done with it."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence

from reliable_job import signals
from reliable_job.ports import OutboxStore, StagedJob
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)

COMPLETION_BATCH = 500
"""Ids deleted by one statement; a flush starts as soon as this many are waiting."""
MAX_BUFFERED = 10_000
"""Most ids waiting in one process; beyond it the oldest are dropped (their rows are redelivered
after ``redeliver_after``: a duplicate, never a loss)."""
RETRY_PAUSE = 0.5
"""Shortest wait, in seconds, before a flush that failed is tried again."""


class Completion:
    """Deletes the row of a job that succeeded; deletes or buries one that failed for good.

    Built from :class:`~reliable_job.settings.Settings`: ``completion_interval`` (the
    ``interval``) and ``preserve_dead_jobs``. With ``interval > 0`` deletes are batched: the ids
    wait in a buffer of the current process and a daemon thread deletes them in one statement
    every ``interval`` seconds, or as soon as ``batch`` ids are waiting. The buffer and the thread
    belong to the process that made them: a forked child (Celery's prefork pool) starts its own
    and never flushes its parent's. Burying (``preserve_dead_jobs``) stays synchronous.
    ``flush()``/``close()`` are called on worker shutdown (and at exit); a process killed outright
    loses at most its buffered ids, whose rows stay ``sent`` and are published again after
    ``redeliver_after``.

    Errors are logged, never raised: a failed delete must not fail the task.
    """

    def __init__(
        self,
        store: OutboxStore,
        settings: Settings,
        *,
        batch: int = COMPLETION_BATCH,
        max_buffered: int = MAX_BUFFERED,
        getpid: Callable[[], int] = os.getpid,
    ) -> None:
        """``batch``, ``max_buffered`` and ``getpid`` are for tests."""
        self.store = store
        self.preserve_dead_jobs = settings.preserve_dead_jobs
        self.interval = interval = settings.completion_interval
        self.batch = max(1, batch)
        self.max_buffered = max(self.batch, max_buffered)
        self._getpid = getpid
        self._init_state(None)
        self._atexit = False
        if interval > 0 and hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def _after_fork_in_child() -> None:
                completion = ref()
                if completion is not None:
                    completion._init_state(None)

            os.register_at_fork(after_in_child=_after_fork_in_child)

    def _init_state(self, pid: int | None) -> None:
        # A fresh lock too: after fork the parent's may be held by a thread that does not exist here.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flushing = threading.Lock()
        self._pid = pid
        self._pending: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._retry_at = 0.0

    # -- the task's outcome ----------------------------------------------------------------------

    def succeeded(self, job_id: str) -> None:
        if signals.job_completed.receivers:
            signals.job_completed.send(self, outcome="succeeded", job_ids=[job_id])
        if self.interval > 0:
            self._add(job_id)
            return
        try:
            self.store.complete_many([job_id])
        except Exception:
            logger.exception(
                "could not delete the outbox row of job %s",
                job_id,
                extra={"reliable_job.job_id": job_id},
            )

    def failed(self, job_id: str, error: str, *, outcome: str = "failed") -> None:
        """The job failed for good; ``outcome`` (``failed``, ``revoked``, ``expired``,
        ``rejected``) is what :data:`~reliable_job.signals.job_completed` reports."""
        if signals.job_completed.receivers:
            signals.job_completed.send(self, outcome=outcome, job_ids=[job_id])
        if not self.preserve_dead_jobs and self.interval > 0:
            self._add(job_id)
            return
        try:
            if self.preserve_dead_jobs:
                if self.store.bury(job_id, error) and signals.job_dead.receivers:
                    signals.job_dead.send(self, reason="final_failure", count=1, job_ids=[job_id])
            else:
                self.store.complete_many([job_id])
        except Exception:
            logger.exception(
                "could not finish the outbox row of failed job %s",
                job_id,
                extra={"reliable_job.job_id": job_id},
            )

    def hand_off(
        self,
        job_id: str,
        continuations: Sequence[StagedJob],
        *,
        error: str | None = None,
        task_name: str | None = None,
    ) -> bool:
        """The job finished and messages were published on its behalf (a chain's next step,
        callbacks, errbacks, a chord's body, its replacement): write them and finish its row in
        one transaction on the outbox database (:meth:`~reliable_job.ports.OutboxStore.hand_off`),
        at once (not batched). ``error`` is a final failure's: the row is buried with it when
        ``preserve_dead_jobs``, else deleted.

        Never raises: when the transaction fails the row stays ``sent``, so the job is delivered
        again after ``redeliver_after`` and publishes its continuations then (a duplicate, never a
        loss). Returns whether the hand-off was written.
        """
        if signals.job_completed.receivers:
            outcome = "succeeded" if error is None else "failed"
            signals.job_completed.send(self, outcome=outcome, job_ids=[job_id])
        try:
            self.store.hand_off(
                job_id,
                continuations,
                error=error if self.preserve_dead_jobs else None,
                task_name=task_name,
            )
        except Exception:
            logger.exception(
                "could not hand job %s over to its %d continuations; its row stays and the job "
                "will be delivered again after redeliver_after",
                job_id,
                len(continuations),
                extra={"reliable_job.job_id": job_id},
            )
            return False
        if error is not None and self.preserve_dead_jobs and signals.job_dead.receivers:
            signals.job_dead.send(self, reason="final_failure", count=1, job_ids=[job_id])
        return True

    # -- the buffer ------------------------------------------------------------------------------

    def _own(self) -> bool:
        """Make the state this process's (called with the lock held); ``True`` when it was
        another process's (inherited through fork) and was dropped."""
        pid = self._getpid()
        if self._pid == pid:
            return False
        inherited = self._pid is not None
        lock, wake = self._lock, self._wake
        self._init_state(pid)
        self._lock, self._wake = lock, wake  # held by the caller
        return inherited

    def _add(self, job_id: str) -> None:
        start = flush_now = False
        with self._lock:
            self._own()
            if len(self._pending) >= self.max_buffered:
                dropped = self._pending.popleft()
                logger.warning(
                    "completion buffer full (%d ids): not deleting the row of job %s; it will be "
                    "published again after redeliver_after",
                    self.max_buffered,
                    dropped,
                    extra={"reliable_job.job_id": dropped},
                )
            self._pending.append(job_id)
            waiting = len(self._pending)
            if self._stopping:
                flush_now = True  # closed (shutting down): no flusher any more
            elif self._thread is None:
                self._thread = threading.Thread(
                    target=self._run,
                    args=(self._pid,),
                    name="reliable-job-completion",
                    daemon=True,
                )
                start = True
            elif waiting == 1 or waiting >= self.batch:
                self._wake.notify_all()
        if flush_now:
            self.flush()
        if start:
            assert self._thread is not None
            self._thread.start()
            if not self._atexit:
                self._atexit = True
                atexit.register(self.close)

    @property
    def flusher(self) -> threading.Thread | None:
        """This process's flusher thread, once one was started (for diagnostics and tests)."""
        with self._lock:
            return self._thread if self._pid == self._getpid() else None

    @property
    def flusher_running(self) -> bool:
        """Whether this process has a flusher thread alive."""
        thread = self.flusher
        return thread is not None and thread.is_alive()

    def pending(self) -> list[str]:
        """The ids waiting in this process's buffer."""
        with self._lock:
            if self._pid != self._getpid():
                return []
            return list(self._pending)

    def flush(self) -> int:
        """Delete every id waiting in this process's buffer now; return how many rows went.

        Never raises: ids whose delete failed stay buffered for the next flush. A process never
        flushes ids buffered by another one (its parent, before a fork).
        """
        deleted = 0
        with self._flushing:
            while True:
                with self._lock:
                    if self._pid != self._getpid() or not self._pending:
                        return deleted
                    ids = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
                try:
                    deleted += self.store.complete_many(ids)
                except Exception:
                    logger.exception(
                        "could not delete the outbox rows of %d finished jobs; will retry",
                        len(ids),
                    )
                    self._give_back(ids)
                    return deleted

    def _give_back(self, ids: list[str]) -> None:
        with self._lock:
            if self._pid != self._getpid():
                return
            self._pending.extendleft(reversed(ids))
            self._retry_at = time.monotonic() + max(self.interval, RETRY_PAUSE)
            excess = len(self._pending) - self.max_buffered
            if excess > 0:
                dropped = [self._pending.popleft() for _ in range(excess)]
                logger.warning(
                    "completion buffer full (%d ids): not deleting the rows of %d jobs; they will "
                    "be published again after redeliver_after",
                    self.max_buffered,
                    len(dropped),
                )

    def _run(self, pid: int) -> None:
        while True:
            with self._lock:
                while not self._stopping and self._pid == pid and not self._pending:
                    self._wake.wait()
                if self._stopping or self._pid != pid:
                    return
                deadline = max(time.monotonic() + self.interval, self._retry_at)
                while not self._stopping and self._pid == pid:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (
                        len(self._pending) >= self.batch and time.monotonic() >= self._retry_at
                    ):
                        break
                    self._wake.wait(remaining)
                if self._stopping or self._pid != pid:
                    return
            self.flush()

    def stop_flusher(self, timeout: float = 10.0) -> None:
        """Stop this process's flusher, waiting up to ``timeout`` seconds for it, and delete
        nothing: ids buffered from now on are deleted at once (see :meth:`close`)."""
        with self._lock:
            mine = self._pid == self._getpid()
            thread = self._thread if mine else None
            if mine:
                self._stopping = True
                self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop this process's flusher and delete what it still holds (worker shutdown, exit)."""
        self.stop_flusher(timeout)
        self.flush()  # a no-op in a process that holds no ids of its own
