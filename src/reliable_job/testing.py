"""In-memory fakes of the core's ports, for unit tests (yours and ours).

They follow the same contract as the real adapters; they are not for production.
"""

from __future__ import annotations

import fnmatch
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from reliable_job.errors import BrokerUnavailable, DatabaseUnavailable, DuplicateJobError
from reliable_job.ports import (
    ClaimedRow,
    JobAction,
    JobFilter,
    JobRow,
    OutboxStatus,
    OutboxWriter,
    SentRow,
    StagedJob,
)
from reliable_job.schema import DEAD, PENDING, SENT
from reliable_job.settings import Settings
from reliable_job.staging import Stager

if TYPE_CHECKING:
    from reliable_job.ports import Broker, OutboxAdmin, OutboxDatabase, Wakeup


@dataclass
class FakeRow:
    id: int
    job: StagedJob
    state: str = PENDING
    attempts: int = 0
    last_error: str | None = None
    available_at: float = 0.0
    created_at: float = field(default_factory=time.time)
    sent_at: float = 0.0


class _FakeClaim:
    def __init__(self, store: InMemoryStore, rows: list[ClaimedRow]) -> None:
        self._store = store
        self.rows: Sequence[ClaimedRow] = rows
        self._changes: list[tuple[int, dict[str, object]]] = []

    def mark_sent(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            attempts = self._store.rows[row_id].attempts + 1
            self._changes.append((row_id, {"state": SENT, "attempts": attempts, "sent_at": time.time()}))

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        change: dict[str, object] = {"attempts": row.attempts + 1, "last_error": error}
        if retry_in is None:
            change["state"] = DEAD
        else:
            change["available_at"] = time.time() + retry_in
        self._changes.append((row.id, change))

    def defer(self, row: ClaimedRow, retry_in: float) -> None:
        self._changes.append((row.id, {"available_at": time.time() + retry_in}))


class InMemoryStore:
    """The outbox table in a dict, and an :class:`~reliable_job.ports.OutboxDatabase` of its own:
    ``stager`` writes into it (whatever the target: there is no transaction to join), it is its
    only relay store, and relays poll it (no listener). Claims lock rows until the claim ends, like
    SKIP LOCKED."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.rows: dict[int, FakeRow] = {}
        self._ids = itertools.count(1)
        self._locked: set[int] = set()
        self._lock = threading.Lock()
        self.closed = 0
        self.fail_hand_offs = 0
        self.stager = Stager(settings or Settings(), adapt=self._adapt, own_transaction=self._writer)

    def _adapt(self, target: object, explicit: bool) -> OutboxWriter:
        return self

    def _writer(self) -> OutboxWriter:
        return self

    def relay_stores(self) -> Sequence[InMemoryStore]:
        return [self]

    def listener(self) -> Wakeup | None:
        return None

    def close(self) -> None:
        self.closed += 1

    def write(self, jobs: Sequence[StagedJob]) -> None:
        """Stage ``jobs`` (what :attr:`stager` does). An id already present is not written and
        raises :class:`~reliable_job.errors.DuplicateJobError` once the others are."""
        with self._lock:
            conflicts = self._insert(jobs)
        if conflicts:
            raise DuplicateJobError(conflicts)

    def _insert(self, jobs: Sequence[StagedJob]) -> list[str]:
        """Insert the jobs whose id is free (the lock held); return the others' ids."""
        known = {r.job.job_id for r in self.rows.values()}
        conflicts = []
        for job in jobs:
            if job.job_id in known:
                conflicts.append(job.job_id)
                continue
            known.add(job.job_id)
            row_id = next(self._ids)
            self.rows[row_id] = FakeRow(row_id, job)
        return conflicts

    def hand_off(
        self,
        job_id: str,
        jobs: Sequence[StagedJob],
        *,
        error: str | None = None,
        task_name: str | None = None,
    ) -> None:
        """Finish ``job_id``'s row (deleted, or dead with ``error``) and insert ``jobs`` (ids
        already present kept as they are), at once. Set ``fail_hand_offs`` to make the next ones
        raise (nothing changes)."""
        with self._lock:
            if self.fail_hand_offs > 0:
                self.fail_hand_offs -= 1
                raise DatabaseUnavailable("hand-off failed (fake)")
            for i, r in list(self.rows.items()):
                if r.job.job_id == job_id:
                    if error is None:
                        del self.rows[i]
                    else:
                        r.state, r.last_error = DEAD, error
            self._insert(jobs)

    @contextmanager
    def claim(self, limit: int) -> Iterator[_FakeClaim]:
        now = time.time()
        with self._lock:
            picked = [
                r
                for r in sorted(self.rows.values(), key=lambda r: r.id)
                if r.state == PENDING and r.available_at <= now and r.id not in self._locked
            ][:limit]
            self._locked.update(r.id for r in picked)
        claim = _FakeClaim(self, [ClaimedRow(r.id, r.job.job_id, r.job.message, r.attempts) for r in picked])
        try:
            yield claim
            with self._lock:  # commit
                for row_id, change in claim._changes:
                    if row_id in self.rows:
                        for key, value in change.items():
                            setattr(self.rows[row_id], key, value)
        finally:
            with self._lock:
                self._locked.difference_update(r.id for r in picked)

    def complete_many(self, job_ids: Sequence[str]) -> int:
        wanted = set(job_ids)
        with self._lock:
            gone = [i for i, r in self.rows.items() if r.job.job_id in wanted]
            for i in gone:
                del self.rows[i]
            return len(gone)

    def bury(self, job_id: str, error: str) -> int:
        with self._lock:
            hit = [r for r in self.rows.values() if r.job.job_id == job_id]
            for r in hit:
                r.state, r.last_error = DEAD, error
            return len(hit)

    def status(self) -> OutboxStatus:
        with self._lock:
            rows = list(self.rows.values())
        pending = [r for r in rows if r.state == PENDING]
        oldest = min((r.created_at for r in pending), default=None)
        oldest_sent = min((r.sent_at for r in rows if r.state == SENT), default=None)
        return OutboxStatus(
            pending=len(pending),
            sent=sum(r.state == SENT for r in rows),
            dead=sum(r.state == DEAD for r in rows),
            oldest_pending_seconds=None if oldest is None else time.time() - oldest,
            oldest_sent_seconds=None if oldest_sent is None else time.time() - oldest_sent,
        )

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        cutoff = time.time() - older_than
        requeued = dead = 0
        with self._lock:
            for r in self.rows.values():
                due = r.job.eta.timestamp() if r.job.eta else 0.0
                if r.state != SENT or r.sent_at > cutoff or due > cutoff:
                    continue
                if r.attempts >= max_deliveries:
                    r.state, dead = DEAD, dead + 1
                else:
                    r.state, r.available_at, requeued = PENDING, 0.0, requeued + 1
        return requeued, dead

    def postpone(self, job_id: str, due: datetime) -> int:
        with self._lock:
            hit = [r for r in self.rows.values() if r.job.job_id == job_id and r.state != DEAD]
            for r in hit:
                r.job, r.sent_at = replace(r.job, eta=due), time.time()
            return len(hit)

    def sent_rows(self, older_than: float, after_id: int, limit: int, *, due_only: bool) -> list[SentRow]:
        cutoff = time.time() - older_than
        with self._lock:
            rows = [
                SentRow(r.id, r.job.job_id, r.job.message, r.attempts)
                for r in sorted(self.rows.values(), key=lambda r: r.id)
                if r.state == SENT
                and r.id > after_id
                and r.sent_at <= cutoff
                and not (due_only and r.job.eta is not None and r.job.eta.timestamp() > cutoff)
            ]
        return rows[:limit]

    def requeue_sent(self, rows: Sequence[SentRow], max_deliveries: int, error: str) -> tuple[int, int]:
        requeued = dead = 0
        with self._lock:
            for row in rows:
                r = self.rows.get(row.id)
                if r is None or r.state != SENT or r.attempts != row.attempts:
                    continue
                if r.attempts >= max_deliveries:
                    r.state, r.last_error, dead = DEAD, f"{error}, {max_deliveries} times", dead + 1
                else:
                    r.state, r.available_at, r.last_error, requeued = PENDING, 0.0, error, requeued + 1
        return requeued, dead

    def retry_dead(self) -> int:
        with self._lock:
            dead = [r for r in self.rows.values() if r.state == DEAD]
            for r in dead:
                r.state, r.attempts, r.available_at = PENDING, 0, 0.0
            return len(dead)

    # -- job tools (reliable_job.ports.OutboxAdmin) ---------------------------------------------

    def _matches(self, r: FakeRow, where: JobFilter) -> bool:
        if where.states and r.state not in where.states:
            return False
        if where.task and not fnmatch.fnmatchcase(
            r.job.task_name, where.task.replace("[", "[[]").replace("?", "[?]")
        ):
            return False
        if where.created_before is not None and r.created_at > where.created_before.timestamp():
            return False
        if where.waiting and not (r.state == PENDING and r.available_at > time.time()):
            return False
        if where.ids or where.job_ids:
            return r.id in where.ids or r.job.job_id in where.job_ids
        return True

    def _job_row(self, r: FakeRow, *, message: bool = False) -> JobRow:
        def at(value: float) -> datetime | None:
            return datetime.fromtimestamp(value, timezone.utc) if value else None

        return JobRow(
            id=r.id,
            job_id=r.job.job_id,
            task_name=r.job.task_name,
            queue=r.job.queue,
            state=r.state,
            attempts=r.attempts,
            last_error=r.last_error,
            created_at=at(r.created_at),
            eta=r.job.eta,
            available_at=at(r.available_at),
            sent_at=at(r.sent_at),
            updated_at=at(r.created_at),
            message=r.job.message if message else None,
        )

    def find_jobs(self, where: JobFilter, *, limit: int | None = None) -> list[JobRow]:
        with self._lock:
            rows = [self._job_row(r) for _, r in sorted(self.rows.items()) if self._matches(r, where)]
        return rows if limit is None else rows[:limit]

    def count_jobs(self, where: JobFilter) -> int:
        with self._lock:
            return sum(self._matches(r, where) for r in self.rows.values())

    def get_jobs(self, key: str) -> list[JobRow]:
        with self._lock:
            return [
                self._job_row(r, message=True)
                for _, r in sorted(self.rows.items())
                if r.job.job_id == key or str(r.id) == key
            ]

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        if action not in JobAction.ALL:
            raise ValueError(f"unknown job action {action!r}")
        with self._lock:
            ids = [i for i, r in sorted(self.rows.items()) if self._matches(r, where)]
        total = 0
        for start in range(0, len(ids), max(1, batch_size)):
            with self._lock:
                for i in ids[start : start + batch_size]:
                    r = self.rows.get(i)
                    if r is None or i in self._locked:
                        continue
                    if action == JobAction.RETRY_DEAD and r.state == DEAD:
                        r.state, r.attempts, r.available_at = PENDING, 0, 0.0
                    elif action == JobAction.PURGE and r.state in (where.states or (DEAD,)):
                        del self.rows[i]
                    elif (
                        action == JobAction.PUBLISH_NOW
                        and r.state == PENDING
                        and r.available_at > time.time()
                    ):
                        r.available_at = time.time()
                    else:
                        continue
                    total += 1
            if progress is not None:
                progress(total)
        return total


class InMemoryBroker:
    """Collects published messages. Set ``down`` to simulate an outage, ``reject`` to refuse
    particular messages (by their text) as a poison message would be."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.down = False
        self.reject: set[str] = set()
        self.closed = 0

    def connect(self) -> None:
        if self.down:
            raise BrokerUnavailable("broker is down (fake)")

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        if self.down:
            raise BrokerUnavailable("broker is down (fake)")
        failures: dict[int, Exception] = {}
        for row in rows:
            if row.message in self.reject:
                failures[row.id] = ValueError("rejected (fake)")
            else:
                self.published.append(row.message)
        return failures

    def close(self) -> None:
        self.closed += 1


class InMemoryWakeup:
    """A relay's wake-up channel: :meth:`notify` wakes the relay's wait; set ``broken`` to make
    the next wait fail as a lost listening connection would."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._notified = False
        self.broken = False
        self.closed = False

    def notify(self) -> None:
        self._notified = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        if self.broken:
            raise ConnectionError("listening connection lost (fake)")
        self._event.wait(timeout)
        self._event.clear()
        notified, self._notified = self._notified, False
        return notified

    def interrupt(self) -> None:
        self._event.set()

    def close(self) -> None:
        self.closed = True


if TYPE_CHECKING:

    def _conforms(store: InMemoryStore, broker: InMemoryBroker, wakeup: InMemoryWakeup) -> None:
        database: OutboxDatabase = store
        admin: OutboxAdmin = store
        ports: tuple[Broker, Wakeup] = (broker, wakeup)
        del database, admin, ports
