"""The worker's started markers (:mod:`~reliable_job.integrations.celery.lost`), written off the
task's path.

A reliable task used to spend two Redis round trips of its own: a ``SET`` with a TTL in
``task_prerun`` (the job started) and an ``EXPIRE`` in ``task_postrun`` (it ended: the marker
outlives it a short while). Profiled in a prefork child, those two took more time than a small
task's body. Now they are appended to a buffer of the current process, and a daemon thread of that
process writes the buffer in one Redis pipeline every :data:`INTERVAL` seconds (at once when
:data:`BATCH` are waiting).

Why this keeps the promise:

- The loss check (:mod:`~reliable_job.recovery`) only looks at rows published at least
  ``lost_check_after`` ago, and republishes a row only when its message is missing at two checks
  in a row, at least a second apart (``check_every``). A started marker written a few
  milliseconds late is there by the second check: the job is left alone, as before.
- Order is kept: one process's markers are written in the order they were made (one FIFO buffer,
  drained front first into one pipeline, which Redis runs in order; one flush at a time), so a
  job's ``EXPIRE`` never overtakes its ``SET``, and the retry's longer ``SET`` (written by
  :meth:`~reliable_job.integrations.celery.app.CeleryIntegration` through the same
  :func:`~reliable_job.integrations.celery.lost.mark_started`, in the same process, while the job
  runs) is never overtaken by the shorter one its ``task_prerun`` made.
- A process killed before its buffer was written leaves a job that started and whose marker is
  missing: the loss check publishes it again. That job started (and may have finished) on a worker
  that crashed: a duplicate after a crash, the documented case, never a loss. A marker that is not
  written at all (Redis down) is as before: errors are logged at debug and dropped.
- A ``mark_finished`` written late only leaves the marker longer than needed: harmless.

The buffer and its thread belong to the process that made them (as
:class:`~reliable_job.completion.Completion`'s): a forked child (Celery's prefork pool) starts its
own and never writes its parent's. Worker shutdown (``worker_process_shutdown`` in a prefork child,
``worker_shutdown`` in the main process) and exit write what is left (:func:`close`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

INTERVAL = 0.025
"""Seconds a marker waits at most in its process's buffer (while the writer thread runs)."""
BATCH = 200
"""Markers waiting that make the thread write at once."""
MAX_BUFFERED = 10_000
"""Most markers waiting in one process; beyond it the caller writes the buffer itself (the thread
is not keeping up): never dropped for lack of room."""

SET = "set"
"""A started marker: ``SET key 1 EX ttl``."""
EXPIRE = "expire"
"""A finished one: ``EXPIRE key ttl``."""

_Entry = tuple[Any, str, str, int]
"""(the Redis client, :data:`SET` or :data:`EXPIRE`, the key, the TTL in seconds)."""


class MarkerWriter:
    """The buffer of markers of the current process and its writer thread (module docstring)."""

    def __init__(
        self,
        *,
        interval: float = INTERVAL,
        batch: int = BATCH,
        max_buffered: int = MAX_BUFFERED,
        getpid: Callable[[], int] = os.getpid,
    ) -> None:
        """Every argument is for tests."""
        self.interval = max(0.0, interval)
        self.batch = max(1, batch)
        self.max_buffered = max(self.batch, max_buffered)
        self._getpid = getpid
        self._init_state(None)
        self._atexit = False
        self.pipelines = 0
        """Pipelines this process executed (for tests and diagnostics)."""
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def _after_fork_in_child() -> None:
                writer = ref()
                if writer is not None:
                    writer._init_state(None)
                    writer.pipelines = 0

            os.register_at_fork(after_in_child=_after_fork_in_child)

    def _init_state(self, pid: int | None) -> None:
        # A fresh lock too: after fork the parent's may be held by a thread that does not exist here.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writing = threading.Lock()
        self._pid = pid
        self._pending: deque[_Entry] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _own(self) -> None:
        """Make the state this process's (called with the lock held): one inherited through fork
        is dropped, never written twice."""
        pid = self._getpid()
        if self._pid == pid:
            return
        lock, wake = self._lock, self._wake
        self._init_state(pid)
        self._lock, self._wake = lock, wake  # held by the caller

    def add(self, client: Any, op: str, key: str, ttl: int) -> None:
        """Buffer one marker (``op`` is :data:`SET` or :data:`EXPIRE`); never raises."""
        start = write_now = False
        with self._lock:
            self._own()
            self._pending.append((client, op, key, ttl))
            waiting = len(self._pending)
            if self._stopping or self.interval <= 0 or waiting >= self.max_buffered:
                write_now = True  # closed, unbuffered, or the thread is not keeping up
            elif self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._pid,), name="reliable-job-markers", daemon=True
                )
                start = True
            elif waiting == 1 or waiting == self.batch:
                self._wake.notify_all()
        if start:
            assert self._thread is not None
            self._thread.start()
            if not self._atexit:
                self._atexit = True
                atexit.register(self.close)
        if write_now:
            self.flush()

    def pending(self) -> list[tuple[str, str, int]]:
        """The markers waiting in this process's buffer: (op, key, ttl), oldest first."""
        with self._lock:
            if self._pid != self._getpid():
                return []
            return [(op, key, ttl) for _, op, key, ttl in self._pending]

    @property
    def writer_thread(self) -> threading.Thread | None:
        """This process's writer thread, once one was started (for diagnostics and tests)."""
        with self._lock:
            return self._thread if self._pid == self._getpid() else None

    def flush(self) -> int:
        """Write every marker waiting in this process's buffer now, in order; return how many
        were sent. Never raises (a failed pipeline is logged at debug and dropped); a process
        never writes markers buffered by another one (its parent, before a fork)."""
        sent = 0
        with self._writing:  # one flush at a time: a later one never overtakes an earlier one
            while True:
                with self._lock:
                    if self._pid != self._getpid() or not self._pending:
                        return sent
                    entries = list(self._pending)
                    self._pending.clear()
                self._write(entries)
                sent += len(entries)

    def _write(self, entries: list[_Entry]) -> None:
        # Nearly always one client (one app); several keep each one's order in its own pipeline.
        by_client: dict[int, tuple[Any, list[_Entry]]] = {}
        for entry in entries:
            by_client.setdefault(id(entry[0]), (entry[0], []))[1].append(entry)
        for client, group in by_client.values():
            try:
                with client.pipeline(transaction=False) as pipe:
                    for _, op, key, ttl in group:
                        if op == SET:
                            pipe.set(key, b"1", ex=ttl)
                        else:
                            pipe.expire(key, ttl)
                    results = pipe.execute(raise_on_error=False)
                self.pipelines += 1
            except Exception:
                logger.debug("could not write %d started markers", len(group), exc_info=True)
                continue
            failed = sum(1 for result in results if isinstance(result, Exception))
            if failed:
                logger.debug("%d of %d started markers not written", failed, len(group))

    def _run(self, pid: int) -> None:
        while True:
            with self._lock:
                while not self._stopping and self._pid == pid and not self._pending:
                    self._wake.wait()
                if self._stopping or self._pid != pid:
                    return
                deadline = time.monotonic() + self.interval
                while not self._stopping and self._pid == pid and len(self._pending) < self.batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                if self._stopping or self._pid != pid:
                    return
            self.flush()

    def close(self, timeout: float = 5.0) -> None:
        """Stop this process's writer thread and write what is left (worker shutdown, exit);
        markers made afterwards are written at once."""
        with self._lock:
            mine = self._pid == self._getpid()
            thread = self._thread if mine else None
            if mine:
                self._stopping = True
                self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.flush()


writer = MarkerWriter()
"""The markers of this process (one per process; a forked child starts afresh)."""


def flush() -> int:
    """Write this process's buffered markers now (tests, and code that must see them in Redis)."""
    return writer.flush()


def close() -> None:
    """Write what is left and stop the writer thread (worker shutdown)."""
    writer.close()
