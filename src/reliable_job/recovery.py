"""Published jobs that never completed: noticing lost messages soon, and one recovery, not two.

Two checks, both run by the relay between passes, both only when the store can list its ``sent``
rows (:class:`~reliable_job.ports.SentRows`) and the broker can say where a message is
(:class:`~reliable_job.ports.MessageLocator`, the Redis fast path):

- **The loss check** (every few seconds, rows ``sent`` at least ``lost_check_after`` ago): a row
  whose message is neither queued, nor held by a worker (the broker's unacknowledged set), nor
  started by a worker is *missing*; missing at two checks in a row (so that a message caught
  between a worker's pop and its bookkeeping is not mistaken for lost), it is published again. A
  broker that lost its messages (``FLUSHALL``, a restart without persistence) is noticed within
  about ``lost_check_after``; a message still queued is never republished, however long the queue.
- **The backstop** (``redeliver_after``): a row ``sent`` that long is published again unless its
  message is still queued, or held in the broker's unacknowledged set. A held message is taken
  out of that set first, atomically, so that either the broker restores it (kombu's
  ``visibility_timeout``) or the relay publishes it again, never both: a job whose worker died
  runs at most once more.

A row is requeued only if it is still ``sent`` with the attempts it was checked with, so two
relays checking the same rows requeue it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import cast

from reliable_job import signals
from reliable_job.errors import BrokerUnavailable, DatabaseUnavailable
from reliable_job.ports import Broker, MessageLocator, OutboxStore, SentRow, SentRows, Whereabouts

logger = logging.getLogger("reliable_job.relay")
"""The relay's logger: these lines are the relay's to its operators."""

PAGE = 500
"""Rows one check looks at (the next check continues after the last one)."""
BACKSTOP_PAGES = 20
"""Pages the backstop walks per pass at most (it continues on the next pass)."""
_KEEP = (Whereabouts.QUEUED, Whereabouts.HELD)
"""What the backstop leaves alone: the message is on the broker, or the broker restores it."""


class Recovery:
    """The loss check and the backstop of one relay (see the module's docstring)."""

    def __init__(
        self,
        store: OutboxStore,
        broker: Broker,
        *,
        lost_check_after: float,
        redeliver_after: float,
        max_deliveries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        has_rows = callable(getattr(store, "sent_rows", None)) and callable(
            getattr(store, "requeue_sent", None)
        )
        self.store = store
        self.rows: SentRows | None = cast("SentRows", store) if has_rows else None
        self.locator: MessageLocator | None = (
            cast("MessageLocator", broker) if callable(getattr(broker, "locate", None)) else None
        )
        self.lost_check_after = lost_check_after
        self.redeliver_after = redeliver_after
        self.max_deliveries = max_deliveries
        self.check_every = min(15.0, max(1.0, lost_check_after / 4))
        """Seconds between two loss checks."""
        self._clock = clock
        self._next_check = clock() + (lost_check_after or 0.0)
        self._next_redelivery = clock()
        self._cursor = 0
        self._backstop_cursor = 0
        self._suspects: dict[int, int] = {}
        """Rows found missing by a check, with the attempts they had then: lost when found
        missing again by a later one."""
        self.recovered = 0
        """Rows the loss check published again (for tests and diagnostics)."""

    @property
    def available(self) -> bool:
        return self.rows is not None and self.locator is not None

    # -- the loss check -----------------------------------------------------------------------

    def check_lost(self) -> int:
        """Run the loss check if one is due; return how many rows it put back to pending."""
        if not self.available or not self.lost_check_after or self._clock() < self._next_check:
            return 0
        self._next_check = self._clock() + self.check_every
        assert self.rows is not None and self.locator is not None
        try:
            rows = self.rows.sent_rows(self.lost_check_after, self._cursor, PAGE, due_only=False)
            first = self._cursor
            self._cursor = rows[-1].id if len(rows) == PAGE else 0
            whereabouts = self.locator.locate(rows, take_over=False) if rows else {}
        except Exception as exc:
            logger.warning("lost-message check skipped: %s: %s", type(exc).__name__, exc)
            return 0
        last = rows[-1].id if len(rows) == PAGE else None
        seen = {row.id for row in rows}
        for row_id in [i for i in self._suspects if i > first and (last is None or i <= last)]:
            if row_id not in seen:
                del self._suspects[row_id]  # completed (or requeued) since
        lost: list[SentRow] = []
        for row in rows:
            if whereabouts.get(row.id) != Whereabouts.MISSING:
                self._suspects.pop(row.id, None)
            elif self._suspects.get(row.id) == row.attempts:
                del self._suspects[row.id]
                lost.append(row)
            else:
                self._suspects[row.id] = row.attempts
        if not lost:
            return 0
        note = f"message lost by the broker (missing {self.lost_check_after:.0f}s after publishing)"
        requeued, dead = self._requeue(lost, note)
        _signal(self, "lost", requeued, dead)
        if requeued:
            logger.warning(
                "%d job(s) published %.0fs ago or more are no longer on the broker (not queued, "
                "not held by a worker, not started): publishing them again",
                requeued,
                self.lost_check_after,
            )
        if dead:
            logger.error("%d lost job(s) already delivered %d times: set dead", dead, self.max_deliveries)
        self.recovered += requeued
        return requeued

    # -- the backstop -------------------------------------------------------------------------

    def redeliver_due(self) -> None:
        """The backstop, when it is due (every ``redeliver_after / 10`` seconds, 1 s to 60 s):
        broker-aware where the store and the broker allow it (:meth:`redeliver`), else every row
        ``sent`` that long goes back to pending (``requeue_unfinished``)."""
        if not self.redeliver_after or self._clock() < self._next_redelivery:
            return
        self._next_redelivery = self._clock() + min(60.0, max(1.0, self.redeliver_after / 10))
        if self.available:
            # one recovery, not two: messages still queued or held by the broker are left alone
            try:
                requeued, dead = self.redeliver()
            except (BrokerUnavailable, DatabaseUnavailable):
                raise
            except Exception as exc:
                logger.warning("redelivery skipped: %s: %s", type(exc).__name__, exc)
                return
        else:
            requeued, dead = self.store.requeue_unfinished(self.redeliver_after, self.max_deliveries)
        _signal(self, "redeliver_after", requeued, dead)
        if requeued:
            logger.warning(
                "%d job(s) published more than %.0fs ago never completed: publishing them again",
                requeued,
                self.redeliver_after,
            )
        if dead:
            logger.error("%d job(s) never completed after %d deliveries: set dead", dead, self.max_deliveries)

    def redeliver(self) -> tuple[int, int]:
        """Requeue rows ``sent`` for ``redeliver_after`` whose message is neither queued nor held
        (a held one is taken from the broker's unacknowledged set first); ``(requeued, dead)``."""
        assert self.rows is not None and self.locator is not None
        note = f"not completed {self.redeliver_after:.0f}s after publishing"
        requeued = dead = 0
        for _ in range(BACKSTOP_PAGES):
            rows = self.rows.sent_rows(self.redeliver_after, self._backstop_cursor, PAGE, due_only=True)
            self._backstop_cursor = rows[-1].id if len(rows) == PAGE else 0
            if rows:
                whereabouts = self.locator.locate(rows, take_over=True)
                again = [row for row in rows if whereabouts.get(row.id, Whereabouts.UNKNOWN) not in _KEEP]
                if again:
                    counts = self._requeue(again, note)
                    requeued, dead = requeued + counts[0], dead + counts[1]
            if not self._backstop_cursor:
                break
        return requeued, dead

    def _requeue(self, rows: Sequence[SentRow], note: str) -> tuple[int, int]:
        assert self.rows is not None
        return self.rows.requeue_sent(rows, self.max_deliveries, note)


def _signal(sender: Recovery, reason: str, requeued: int, dead: int) -> None:
    """Tell :mod:`reliable_job.signals`' receivers what a check did (counts only: the store does
    not say which of the rows it was given it requeued)."""
    if requeued and signals.job_redelivered.receivers:
        signals.job_redelivered.send(sender, count=requeued, reason=reason)
    if dead and signals.job_dead.receivers:
        signals.job_dead.send(sender, reason="never_completed", count=dead, job_ids=None)
