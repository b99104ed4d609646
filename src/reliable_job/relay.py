"""The relay: claims committed rows, publishes them, marks them sent.

One pass (:meth:`Relay.run_once`) is one short database transaction:

    claim up to ``batch_size`` pending rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL)
    -> publish them in one broker round trip -> mark them sent -> COMMIT

A crash anywhere before COMMIT leaves the rows pending, so the next pass publishes them again: at
most one batch is delivered twice. Rows locked by another relay are skipped, so concurrent relays
never publish the same row unless one of them crashed. (That is the PostgreSQL claim. On SQLite,
whose one write lock must not be held across the broker round trip, the claim is a lease: rows are
leased in one short transaction and marked in another after publishing; a crash in between leaves
them leased until the lease ends. The claim is the store's business: the relay sees the same
:class:`~reliable_job.ports.Claim` either way.)

Between passes: a full batch is followed at once by the next pass. Otherwise the relay waits
``hot_poll`` while it is busy (for ``hot_window`` seconds after a pass that found rows or a
wake-up), then ``poll_interval``. How it waits is :class:`~reliable_job.wakeups.IdleWait`'s: with
a :class:`~reliable_job.ports.Wakeup` (PostgreSQL ``LISTEN``) a notification ends any wait at
once; when listening fails the relay logs it, polls, and tries to listen again later.

A relay builds itself from :class:`~reliable_job.settings.Settings` (batch size, polls, backoff,
redelivery, ``listen_notify``); the keyword options are for tests and for the integration that
supplies the wake-up source. :class:`RelayGroup` runs one relay per outbox database as one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

from reliable_job import signals
from reliable_job.backoff import backoff_delay
from reliable_job.errors import BrokerUnavailable, DatabaseUnavailable, UnknownMessageFormat
from reliable_job.heartbeat import Heartbeat
from reliable_job.ports import Broker, Claim, ClaimedRow, OutboxStore, Wakeup
from reliable_job.recovery import Recovery
from reliable_job.settings import Settings
from reliable_job.wakeups import IdleWait

logger = logging.getLogger(__name__)

UNKNOWN_FORMAT_RETRY = 60.0
"""Seconds a row in a format version newer than this relay reads waits before it is claimed again.

Long enough that relays do not spin on such rows, short enough that relays upgraded meanwhile
publish them soon after. The row stays pending; its attempts are not counted."""


class Relay:
    def __init__(
        self,
        store: OutboxStore,
        broker: Broker,
        settings: Settings,
        *,
        listen: Callable[[], Wakeup | None] | None = None,
        wait: Callable[[threading.Event, float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        hot_window: float = 1.0,
        listen_retry: float = 30.0,
    ) -> None:
        """``listen`` is the wake-up source (the store's ``listener``), used unless
        ``settings.listen_notify`` is off; ``wait``, ``clock``, ``hot_window`` and ``listen_retry``
        are for tests."""
        self.store = store
        self.broker = broker
        self.settings = settings
        self.batch_size = settings.batch_size
        self.poll_interval = settings.poll_interval
        self.backoff_cap = settings.backoff_cap
        self.max_publish_attempts = settings.max_publish_attempts
        self.redeliver_after = settings.redeliver_after
        self.lost_check_after = settings.lost_check_after
        self.recovery = Recovery(
            store,
            broker,
            lost_check_after=settings.lost_check_after,
            redeliver_after=settings.redeliver_after,
            max_deliveries=settings.max_publish_attempts,
            clock=clock,
        )
        """The loss check and the backstop's broker-aware path (:mod:`reliable_job.recovery`)."""
        self.stopping = threading.Event()
        self._clock = clock
        self._wait = wait or (lambda event, seconds: event.wait(seconds))
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self.published = 0
        self.hot_poll = min(settings.hot_poll, settings.poll_interval)
        self.hot_window = hot_window
        self._hot_until = float("-inf")
        self._waiting = IdleWait(
            listen if settings.listen_notify else None,
            self.stopping,
            poll_interval=settings.poll_interval,
            listen_retry=listen_retry,
            clock=clock,
            wait=self._wait,
        )
        self._unknown_formats: set[int] = set()
        """Format versions this relay met and could not read (each logged once)."""
        self.heartbeat = Heartbeat(
            store, interval=settings.heartbeat_interval, path=settings.heartbeat_file, clock=clock
        )
        """The heartbeat file and the relay's row in ``<table>_relays`` (:mod:`reliable_job.heartbeat`)."""
        self._hot_wait = self.hot_poll
        """The next wait of a hot relay that listens (see :meth:`_next_hot_wait`)."""

    def run_once(self) -> int:
        """Claim, publish and mark one batch; return how many rows it held."""
        started = time.perf_counter() if signals.relay_pass.receivers else 0.0
        self.broker.connect()  # never hold claimed rows while waiting for a broker connection
        with self.store.claim(self.batch_size) as claim:
            rows = claim.rows
            if not rows:
                if started:
                    signals.relay_pass.send(
                        self, duration=time.perf_counter() - started, published=0, handled=0
                    )
                return 0
            failures = self.broker.publish(rows)
            sent = [row.id for row in rows if row.id not in failures]
            claim.mark_sent(sent)
            dead: list[str] = []
            refused: list[tuple[ClaimedRow, str]] = []
            for row in rows:
                error = failures.get(row.id)
                if error is None:
                    continue
                if isinstance(error, UnknownMessageFormat):
                    self._defer_unknown_format(claim, row, error)
                    continue
                attempts = row.attempts + 1
                text = f"{type(error).__name__}: {error}"
                refused.append((row, text))
                if attempts >= self.max_publish_attempts:
                    logger.error(
                        "job %s cannot be published after %d attempts, set dead: %s",
                        row.job_id,
                        attempts,
                        text,
                        extra={"reliable_job.job_id": row.job_id},
                    )
                    claim.mark_failed(row, text, retry_in=None)
                    dead.append(row.job_id)
                else:
                    retry_in = backoff_delay(attempts, cap=self.backoff_cap)
                    logger.warning(
                        "job %s could not be published (attempt %d), retrying in %.1fs: %s",
                        row.job_id,
                        attempts,
                        retry_in,
                        text,
                        extra={"reliable_job.job_id": row.job_id},
                    )
                    claim.mark_failed(row, text, retry_in=retry_in)
        self.published += len(sent)
        if started or failures or signals.job_published.receivers:
            self._signal_pass(rows, sent, refused, dead, started)
        return len(rows)

    def _signal_pass(
        self,
        rows: Sequence[ClaimedRow],
        sent: Sequence[int],
        refused: Sequence[tuple[ClaimedRow, str]],
        dead: Sequence[str],
        started: float,
    ) -> None:
        """A pass with rows committed: tell the receivers of :mod:`reliable_job.signals`, once
        per signal for the whole batch."""
        if sent and signals.job_published.receivers:
            published = set(sent)
            signals.job_published.send(self, rows=[row for row in rows if row.id in published])
        if refused and signals.job_publish_failed.receivers:
            signals.job_publish_failed.send(self, failures=list(refused), error=refused[0][1])
        if dead and signals.job_dead.receivers:
            signals.job_dead.send(self, reason="publish", count=len(dead), job_ids=list(dead))
        if started:
            signals.relay_pass.send(
                self, duration=time.perf_counter() - started, published=len(sent), handled=len(rows)
            )

    def _defer_unknown_format(self, claim: Claim, row: ClaimedRow, error: UnknownMessageFormat) -> None:
        """Leave a row a newer release wrote pending (neither published nor dead, attempts as
        they were) and try it again later; say so once per version."""
        claim.defer(row, UNKNOWN_FORMAT_RETRY)
        if error.version in self._unknown_formats:
            logger.debug("job %s left pending: %s", row.job_id, error)
            return
        self._unknown_formats.add(error.version)
        logger.warning(
            "job %s is stored in message format version %d, newer than this relay reads: "
            "rows in that format stay pending (tried again every %.0fs) until relays that read it "
            "run; upgrade relays before producers (README: Rolling it out)",
            row.job_id,
            error.version,
            UNKNOWN_FORMAT_RETRY,
            extra={"reliable_job.job_id": row.job_id},
        )

    def run(self) -> None:
        """Relay until :meth:`stop` is called; the batch in flight is finished first."""
        logger.info("relay started (batch size %d)", self.batch_size)
        try:
            while not self.stopping.is_set():
                try:
                    self.redeliver_due()
                    self.check_lost()
                    handled = self.run_once()
                except (BrokerUnavailable, DatabaseUnavailable) as exc:
                    if isinstance(exc, BrokerUnavailable) and signals.job_publish_failed.receivers:
                        signals.job_publish_failed.send(
                            self, failures=[], error=f"{type(exc).__name__}: {exc}"
                        )
                    self._wait(self.stopping, self._on_outage(exc))
                    self._beat()
                    continue
                except Exception as exc:
                    logger.exception("relay pass failed; retrying")
                    self._wait(self.stopping, self._on_outage(exc))
                    self._beat()
                    continue
                self._on_success()
                self.heartbeat.passed()
                self._beat()
                if handled >= self.batch_size:
                    continue
                if handled:
                    self._hot_until = self._clock() + self.hot_window
                    self._hot_wait = self.hot_poll
                hot = self._clock() < self._hot_until
                self.idle(self._next_hot_wait() if hot else self.poll_interval)
        finally:
            self.heartbeat.stopped()
            self.broker.close()
            self._waiting.close()
            logger.info("relay stopped (%d published)", self.published)

    @property
    def listening(self) -> bool:
        """Whether the relay is listening for wake-ups right now."""
        return self._waiting.listening

    @property
    def listens(self) -> bool:
        """Whether the relay listens, or will try to, for wake-ups: ``False`` when it only polls
        (``listen_notify`` off, no wake-up source, or a database without notifications)."""
        return self._waiting.listens

    @property
    def wakeups(self) -> int:
        """Notifications that woke this relay (for tests and diagnostics)."""
        return self._waiting.wakeups

    @property
    def listen_retry(self) -> float:
        """Seconds before listening is tried again after it failed."""
        return self._waiting.listen_retry

    @listen_retry.setter
    def listen_retry(self, seconds: float) -> None:
        self._waiting.listen_retry = seconds

    def idle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the next pass; a notification or :meth:`stop` ends it."""
        if self._waiting.wait(seconds):
            self._hot_until = self._clock() + self.hot_window
            self._hot_wait = self.hot_poll

    def _next_hot_wait(self) -> float:
        """The wait before the next pass of a hot relay.

        Polling only: ``hot_poll`` every time (a job staged without a notification is found within
        ``hot_poll``). Listening: every job's staging notifies, except one staged within
        ``notify_interval`` of an earlier notification from its process (the throttle), and such a
        job is usually committed a few milliseconds after the one that notified. So the waits after
        a pass double from ``hot_poll`` up to ``poll_interval`` while the passes find nothing, and
        start over at ``hot_poll`` when one finds rows or a notification arrives: at trickle rates
        a relay runs a few passes per wake-up instead of one every ``hot_poll`` for ``hot_window``
        (an empty claim is still a transaction), and a throttled job waits at most
        ``poll_interval``, as it would once the relay is idle."""
        wait = self._hot_wait
        if self._waiting.listening:
            self._hot_wait = min(wait * 2, self.poll_interval)
        return wait

    def redeliver_due(self) -> None:
        """Every ``redeliver_after / 10`` seconds (1 s to 60 s), put published jobs that never
        completed back to pending: the broker or a worker lost them
        (:meth:`~reliable_job.recovery.Recovery.redeliver_due`)."""
        self.recovery.redeliver_due()

    def check_lost(self) -> None:
        """Every few seconds, publish again the jobs ``sent`` for ``lost_check_after`` whose
        message the broker no longer has (:meth:`~reliable_job.recovery.Recovery.check_lost`)."""
        self.recovery.check_lost()

    def stop(self) -> None:
        self.stopping.set()
        self._waiting.interrupt()

    def _beat(self) -> None:
        """Touch the heartbeat file; write the relay's row when it is due."""
        outage = None
        if self._outage_since is not None:
            outage = datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - self._outage_since)
        self.heartbeat.beat(published=self.published, listening=self.listening, outage_since=outage)

    def _on_outage(self, exc: Exception) -> float:
        self._outage_attempts += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning("relay paused, rows stay pending: %s", exc)
        return backoff_delay(self._outage_attempts, cap=self.backoff_cap)

    def _on_success(self) -> None:
        self.last_pass_at = time.time()
        if self._outage_since is not None:
            logger.warning("relay resumed after %.1fs", time.monotonic() - self._outage_since)
            self._outage_since = None
            self._outage_attempts = 0

    # -- what monitoring reads (celery inspect stats: integrations/celery/visibility.py) ---------

    last_pass_at: float | None = None
    """Wall-clock time (``time.time()``) of the end of the last pass that reached the database and
    the broker, or ``None`` before the first one."""

    @property
    def outage_since(self) -> float | None:
        """Wall-clock time (``time.time()``) at which the current outage began (the database or
        the broker unreachable, or a pass failing), or ``None`` when the relay is not paused."""
        since = self._outage_since
        if since is None:
            return None
        return time.time() - (time.monotonic() - since)


class RelayGroup:
    """Several relays (one per outbox database) run and stopped as one."""

    def __init__(self, relays: Sequence[Relay]) -> None:
        if not relays:
            raise ValueError("a relay group needs at least one relay")
        self.relays = list(relays)

    @property
    def published(self) -> int:
        return sum(relay.published for relay in self.relays)

    @property
    def wakeups(self) -> int:
        return sum(relay.wakeups for relay in self.relays)

    def run(self) -> None:
        """Run every relay (the first in this thread) until :meth:`stop`."""
        threads = [
            threading.Thread(target=relay.run, name="reliable-job-relay", daemon=True)
            for relay in self.relays[1:]
        ]
        for thread in threads:
            thread.start()
        try:
            self.relays[0].run()
        finally:
            self.stop()
            for thread in threads:
                thread.join(timeout=30)

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
