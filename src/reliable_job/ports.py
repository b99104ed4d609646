"""The two ports between the core and its adapters: the outbox database and the broker.

Adapters (``reliable_job.integrations.*``) implement them; ``reliable_job.testing`` has in-memory
fakes for unit tests of the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime: an aware one converted, a naive one taken as UTC (as
    Celery's worker reads a naive eta). Every time the outbox stores is UTC: SQLite keeps no
    offset, so a value in another zone would be compared by its wall time."""
    if value is None or value.tzinfo is timezone.utc:
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


@dataclass(frozen=True)
class StagedJob:
    """One job, ready to be written to the outbox: the finished broker message and its keys."""

    job_id: str
    task_name: str
    queue: str
    message: str
    """The finished broker message, JSON text. The relay publishes it without re-encoding."""
    eta: datetime | None = None
    """When the job is due, for countdown/eta jobs (redelivery waits for it): aware UTC (given in
    another zone, it is converted; naive, it is taken as UTC)."""

    def __post_init__(self) -> None:
        if self.eta is not None and self.eta.tzinfo is not timezone.utc:
            object.__setattr__(self, "eta", as_utc(self.eta))


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    job_id: str
    message: str
    attempts: int


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    sent: int
    dead: int
    oldest_pending_seconds: float | None
    oldest_sent_seconds: float | None = None
    """Age of the oldest ``sent`` row (published, not completed): a growing value shows stuck
    completions (workers not running the jobs, or not reporting them)."""
    relays: tuple[Mapping[str, object], ...] = ()
    """Each relay's heartbeat row (``RelayBeat.as_dict``): last pass, published, listening, outage."""
    estimated: bool = False
    """The counts are the planner's estimates (PostgreSQL, above ``ESTIMATE_ABOVE`` rows)."""

    def as_dict(self) -> dict[str, int | float | None]:
        return {
            "pending": self.pending,
            "sent": self.sent,
            "dead": self.dead,
            "oldest_pending_seconds": self.oldest_pending_seconds,
        }

    def health_dict(self) -> dict[str, object]:
        """:meth:`as_dict` plus the health figures (``reliable-job status --json``)."""
        return {
            **self.as_dict(),
            "oldest_sent_seconds": self.oldest_sent_seconds,
            "estimated": self.estimated,
            "relays": [dict(relay) for relay in self.relays],
        }


class OutboxWriter(Protocol):
    """Writes staged jobs in some transaction: the caller's, or one of its own."""

    def write(self, jobs: Sequence[StagedJob]) -> None: ...


class Claim(Protocol):
    """Rows claimed by one relay inside one open transaction, committed when the claim ends."""

    rows: Sequence[ClaimedRow]

    def mark_sent(self, ids: Sequence[int]) -> None: ...

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        """Record a publish error; ``retry_in=None`` sets the row dead."""

    def defer(self, row: ClaimedRow, retry_in: float) -> None:
        """Leave the row for later without counting an attempt: pending again in ``retry_in``
        seconds, its ``attempts`` and ``last_error`` as before the claim (a row this relay cannot
        read yet, such as a newer message format, is not buried)."""


class OutboxStore(Protocol):
    """The outbox table, as the relay, completion and the CLI see it."""

    def claim(self, limit: int) -> AbstractContextManager[Claim]:
        """Lock up to ``limit`` publishable rows no other relay holds.

        Raises :class:`~reliable_job.errors.DatabaseUnavailable` when the database is down.
        """

    def complete_many(self, job_ids: Sequence[str]) -> int:
        """Delete the rows of all these jobs (in one statement where the database allows);
        return how many rows went."""

    def bury(self, job_id: str, error: str) -> int:
        """Set the job's row dead with ``error``; return how many rows changed."""

    def hand_off(
        self,
        job_id: str,
        jobs: Sequence[StagedJob],
        *,
        error: str | None = None,
        task_name: str | None = None,
    ) -> None:
        """A finished job hands over to its continuations, atomically: in one transaction on the
        outbox database, insert ``jobs`` (the messages published on the job's behalf: the next
        step of a chain, callbacks, a replacement) and delete the job's row, or set it dead with
        ``error`` when given. One of ``jobs`` may carry ``job_id`` itself (``Task.replace``): it
        takes the row's place. Any other id already in the outbox is kept as it is (a rerun of the
        job handing off again). ``task_name`` is the finished job's task (a layer with several
        databases finds the job's one by it).

        Raises when the transaction fails: then nothing changed (the row stays and the job is
        delivered again)."""

    def status(self) -> OutboxStatus: ...

    def postpone(self, job_id: str, due: datetime) -> int:
        """The job was published again under its own id to run at ``due`` (a Celery retry waiting
        in the worker): set its row's ``eta`` to ``due`` (UTC) and its ``sent_at`` to now, in a
        short transaction of its own, so redelivery waits for ``due`` plus ``redeliver_after``.
        A dead row is left alone. Returns how many rows changed."""

    def retry_dead(self) -> int:
        """Put every dead row back to pending; return how many."""

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        """Sent rows neither completed nor due within ``older_than`` seconds go back to pending
        (they are published again); those already published ``max_deliveries`` times go dead.
        Returns ``(requeued, dead)``."""

    def listener(self) -> Wakeup | None:
        """A relay's wake-up source (PostgreSQL ``LISTEN``), or ``None`` where the relay polls.

        Raises when listening fails: the relay polls and tries again later."""


class Wakeup(Protocol):
    """Tells an idle relay that jobs were staged (PostgreSQL ``LISTEN``), so it need not poll."""

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; ``True`` when a notification arrived.

        Raises when the listening connection fails: the relay falls back to polling.
        """

    def interrupt(self) -> None:
        """Make the wait in progress, or the next one, return at once (the relay is stopping)."""

    def close(self) -> None: ...


class Broker(Protocol):
    """Publishes finished messages."""

    def connect(self) -> None:
        """Make sure the broker is reachable before rows are claimed.

        Raises :class:`~reliable_job.errors.BrokerUnavailable` when it is not.
        """

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        """Publish every row; return the rows that could not be published, by id.

        A row's error is :class:`~reliable_job.errors.UnknownMessageFormat` when its stored format
        is newer than this relay reads: the relay then defers it instead of counting an attempt.

        Raises :class:`~reliable_job.errors.BrokerUnavailable` when the broker cannot be reached:
        then nothing counts as published.
        """

    def close(self) -> None: ...


# -- lost messages: optional ports (a store and a broker that can tell where a message is) ---------


@dataclass(frozen=True)
class SentRow:
    """A ``sent`` row, as the lost-message checks see it."""

    id: int
    job_id: str
    message: str
    attempts: int
    """Publish attempts as stored: the number of its last publication (its delivery tag's)."""


class Whereabouts:
    """Where a published message is, as :meth:`MessageLocator.locate` found it."""

    QUEUED = "queued"
    """In its queue, waiting for a worker (however long the queue)."""
    HELD = "held"
    """In the broker's unacknowledged set (a worker holds it; the broker restores it if the
    worker dies), or taken from it meanwhile by the broker's own restore or the worker's ack."""
    STARTED = "started"
    """Not on the broker any more, but a worker started the job (its early acknowledgement)."""
    TAKEN = "taken"
    """Was in the unacknowledged set and the locator removed it there: the broker will not restore
    it, the relay publishes it again (``take_over``)."""
    MISSING = "missing"
    """Nowhere: not queued, not held, not started."""
    UNKNOWN = "unknown"
    """The locator cannot tell (a message it did not publish itself, another transport)."""


class SentRows(Protocol):
    """A store the lost-message checks can use (optional: without it the relay redelivers with
    :meth:`OutboxStore.requeue_unfinished` alone)."""

    def sent_rows(self, older_than: float, after_id: int, limit: int, *, due_only: bool) -> Sequence[SentRow]:
        """Up to ``limit`` rows ``sent`` at least ``older_than`` seconds ago with ``id > after_id``,
        in id order; with ``due_only``, only those whose eta (if any) is that old too."""

    def requeue_sent(self, rows: Sequence[SentRow], max_deliveries: int, error: str) -> tuple[int, int]:
        """Put these rows back to pending (those published ``max_deliveries`` times: dead), each
        only if it is still ``sent`` with the same ``attempts`` (not completed, not republished
        meanwhile by another relay). ``error`` is their ``last_error`` (the dead ones':
        ``"<error>, <max_deliveries> times"``). Returns ``(requeued, dead)``."""


class MessageLocator(Protocol):
    """A broker that can tell where the messages it published are (optional)."""

    def locate(self, rows: Sequence[SentRow], *, take_over: bool) -> Mapping[int, str]:
        """A :class:`Whereabouts` value for each row, by id. With ``take_over``, a message held in
        the broker's unacknowledged set is removed there (atomically: either the broker restores
        it or this call takes it, never both) and reported ``TAKEN``; ``STARTED`` is not looked
        for (a job running that long is redelivered, as ``redeliver_after`` says)."""


class JobStager(Protocol):
    """Writes staged jobs in the right transaction (:class:`reliable_job.staging.Stager`)."""

    def stage(self, jobs: Sequence[StagedJob], target: object = None) -> None:
        """Write ``jobs`` in ``target``'s transaction, or in the one :mod:`reliable_job.staging`
        resolves when ``target`` is ``None``."""


class OutboxDatabase(OutboxStore, Protocol):
    """What a database layer hands a job-system integration: a stager, and the store(s) the relay,
    completion and the CLI use.

    Implemented by the SQLAlchemy layer (``integrations.sqlalchemy``), the Django layer
    (``integrations.django``, one store per database alias) and the in-memory fake
    (``reliable_job.testing``).
    """

    @property
    def stager(self) -> JobStager: ...

    def relay_stores(self) -> Sequence[OutboxStore]:
        """The stores relays drain: one per database that holds an outbox."""

    def close(self) -> None:
        """Release what the database layer holds (connections kept by completion)."""


# -- job tools: the operator's view of the outbox (``reliable-job jobs``, the Django admin) -------


@dataclass(frozen=True)
class JobFilter:
    """Which rows a job tool reads or changes. Every field narrows; the empty filter is every row.

    ``task`` is a task name, or a pattern where ``*`` stands for any characters (the only wildcard:
    ``%`` and ``_`` are literal). ``created_before`` is aware UTC (``--older-than``: staged before
    it). ``ids`` are outbox row ids, ``job_ids`` Celery task ids; both given, a row matches either.
    ``waiting``: only pending rows not due yet (waiting on a publish backoff).
    """

    states: tuple[str, ...] = ()
    task: str | None = None
    created_before: datetime | None = None
    ids: tuple[int, ...] = ()
    job_ids: tuple[str, ...] = ()
    waiting: bool = False


@dataclass(frozen=True)
class JobRow:
    """One outbox row as the job tools show it: times are aware UTC; ``message`` (the stored
    envelope, JSON text) only when asked for (``jobs show``), else ``None``. ``database`` names the
    database it lives in where there are several (a Django alias), else ``""``."""

    id: int
    job_id: str
    task_name: str
    queue: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime | None
    eta: datetime | None
    available_at: datetime | None
    sent_at: datetime | None
    updated_at: datetime | None
    message: str | None = None
    database: str = ""


class JobAction:
    """What :meth:`OutboxAdmin.change_jobs` does to each matching row. Each action re-checks the
    row's state in its own statement, so a row that moved on meanwhile is left alone."""

    RETRY_DEAD = "retry-dead"
    """Dead rows back to pending (attempts 0, due at once)."""
    PURGE = "purge"
    """Delete the rows (only in the filter's states: the caller decides which it allows)."""
    PUBLISH_NOW = "publish-now"
    """Pending rows waiting on a publish backoff: due now. (On SQLite, rows due within a relay's
    claim lease are left alone: they may be in a relay's hands.)"""
    ALL = (RETRY_DEAD, PURGE, PUBLISH_NOW)


class OutboxAdmin(Protocol):
    """Reading and changing outbox rows on an operator's behalf (``reliable-job jobs``, the
    Django admin). Long changes go in batches of ``batch_size`` row ids, each batch its own short
    transaction (the relays are never held up behind one long statement)."""

    def find_jobs(self, where: JobFilter, *, limit: int | None = None) -> Sequence[JobRow]:
        """Matching rows in id order (without their message), at most ``limit``."""

    def count_jobs(self, where: JobFilter) -> int: ...

    def get_jobs(self, key: str) -> Sequence[JobRow]:
        """The rows whose row id or job id is ``key``, with their message (several only where
        there are several databases)."""

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Apply ``action`` (a :class:`JobAction` value) to the matching rows, ``batch_size`` ids
        per transaction; ``progress`` is called with the running total after each batch.
        Returns how many rows changed."""
