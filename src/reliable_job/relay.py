"""The relay: claims committed rows, publishes them, marks them sent.

One pass (:meth:`Relay.run_once`) is one short database transaction:

    claim up to ``batch_size`` pending rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL)
    -> publish them in one broker round trip -> mark them sent -> COMMIT

A crash anywhere before COMMIT leaves the rows pending, so the next pass publishes them again: at
most one batch is delivered twice. Rows locked by another relay are skipped, so concurrent relays
never publish the same row unless one of them crashed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from reliable_job.backoff import backoff_delay
from reliable_job.errors import BrokerUnavailable, DatabaseUnavailable
from reliable_job.ports import Broker, OutboxStore

logger = logging.getLogger(__name__)


class Relay:
    def __init__(
        self,
        store: OutboxStore,
        broker: Broker,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.2,
        backoff_cap: float = 30.0,
        max_publish_attempts: int = 5,
        redeliver_after: float = 3600.0,
        wait: Callable[[threading.Event, float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.backoff_cap = backoff_cap
        self.max_publish_attempts = max_publish_attempts
        self.redeliver_after = redeliver_after
        self.stopping = threading.Event()
        self._clock = clock
        self._next_redelivery = clock()
        self._wait = wait or (lambda event, seconds: event.wait(seconds))
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self.published = 0

    def run_once(self) -> int:
        """Claim, publish and mark one batch; return how many rows it held."""
        self.broker.connect()  # never hold claimed rows while waiting for a broker connection
        with self.store.claim(self.batch_size) as claim:
            rows = claim.rows
            if not rows:
                return 0
            failures = self.broker.publish(rows)
            sent = [row.id for row in rows if row.id not in failures]
            claim.mark_sent(sent)
            for row in rows:
                error = failures.get(row.id)
                if error is None:
                    continue
                attempts = row.attempts + 1
                text = f"{type(error).__name__}: {error}"
                if attempts >= self.max_publish_attempts:
                    logger.error(
                        "job %s cannot be published after %d attempts, set dead: %s",
                        row.job_id, attempts, text, extra={"reliable_job.job_id": row.job_id},
                    )
                    claim.mark_failed(row, text, retry_in=None)
                else:
                    retry_in = backoff_delay(attempts, cap=self.backoff_cap)
                    logger.warning(
                        "job %s could not be published (attempt %d), retrying in %.1fs: %s",
                        row.job_id, attempts, retry_in, text,
                        extra={"reliable_job.job_id": row.job_id},
                    )
                    claim.mark_failed(row, text, retry_in=retry_in)
        self.published += len(sent)
        return len(rows)

    def run(self) -> None:
        """Relay until :meth:`stop` is called; the batch in flight is finished first."""
        logger.info("relay started (batch size %d)", self.batch_size)
        try:
            while not self.stopping.is_set():
                try:
                    self.redeliver_due()
                    handled = self.run_once()
                except (BrokerUnavailable, DatabaseUnavailable) as exc:
                    self._wait(self.stopping, self._on_outage(exc))
                    continue
                except Exception as exc:
                    logger.exception("relay pass failed; retrying")
                    self._wait(self.stopping, self._on_outage(exc))
                    continue
                self._on_success()
                if handled < self.batch_size:
                    self._wait(self.stopping, self.poll_interval)
        finally:
            self.broker.close()
            logger.info("relay stopped (%d published)", self.published)

    def redeliver_due(self) -> None:
        """Every ``redeliver_after / 10`` seconds (1 s to 60 s), put published jobs that never
        completed back to pending: the broker or a worker lost them."""
        if not self.redeliver_after or self._clock() < self._next_redelivery:
            return
        self._next_redelivery = self._clock() + min(60.0, max(1.0, self.redeliver_after / 10))
        requeued, dead = self.store.requeue_unfinished(
            self.redeliver_after, self.max_publish_attempts
        )
        if requeued:
            logger.warning(
                "%d job(s) published more than %.0fs ago never completed: publishing them again",
                requeued, self.redeliver_after,
            )
        if dead:
            logger.error(
                "%d job(s) never completed after %d deliveries: set dead",
                dead, self.max_publish_attempts,
            )

    def stop(self) -> None:
        self.stopping.set()

    def _on_outage(self, exc: Exception) -> float:
        self._outage_attempts += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning("relay paused, rows stay pending: %s", exc)
        return backoff_delay(self._outage_attempts, cap=self.backoff_cap)

    def _on_success(self) -> None:
        if self._outage_since is not None:
            logger.warning(
                "relay resumed after %.1fs", time.monotonic() - self._outage_since
            )
            self._outage_since = None
            self._outage_attempts = 0
