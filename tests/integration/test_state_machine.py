"""A model-based test that hunts: Hypothesis drives random interleavings of what applications,
relays, brokers and workers do, and of what goes wrong with them, against a real outbox (SQLite
and PostgreSQL) and a real Redis, and checks the README's promise after every step.

Rules: stage a job (in the caller's transaction through the ``reliable_job_session`` option,
``bind()`` or the session provider; in a savepoint released or rolled back; with an explicit id,
fresh, of a finished job, or still in the outbox; a chain or a link callback), commit, roll back,
a relay pass, a relay killed between publishing and COMMIT, broker data loss, a broker command
error on one queue's key (and its repair), a corrupt row, a worker run (Celery's tracer: the task,
then its chain step or link callback, then completion's ``task_success``), a worker killed in the
middle of a job, a worker killed with finished ids still buffered, a completion flush, a
redelivery sweep (``redeliver_after`` has passed: only once the queues and completion buffers are
empty, as the README asks of ``redeliver_after``) and ``retry-dead``.

Invariants, after every step: no job of a transaction that rolled back (or is still open) ever ran;
a job ran more than once only after a fault that touches it (a relay killed with it in its batch, a
worker killed during it or with its id buffered, an operator's retry-dead, a duplicated chain step
before it), and never more than once per such fault plus once per redelivery, redeliveries being at
most ``max_publish_attempts - 1`` per life of the row; a batch the relay reports published is in
Redis, and a killed relay's batch is pending again. At the end of each example, after a drain
phase (the broker repaired, a fresh relay, ``retry-dead``, then relay passes, workers, completion
and redelivery sweeps until nothing moves): every committed job ran at least once (unless its row
was corrupted, or the chain step before it never succeeded, or it was delivered
``max_publish_attempts`` times and lost each time), and the outbox holds only dead rows, each with
its error.

``make test`` runs a bounded, derandomized search; ``make fuzz`` a long random one
(``RELIABLE_JOB_FUZZ_EXAMPLES``, ``RELIABLE_JOB_FUZZ_STEPS``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celery import chain
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session

import reliable_job
from reliable_job.errors import BrokerUnavailable, ReliableJobError
from reliable_job.integrations.sqlalchemy import create_outbox_engine
from reliable_job.ports import ClaimedRow
from reliable_job.schema import DEAD, PENDING, SENT
from tests.conftest import need
from tests.integration.state_machine_world import QUEUES, RelayKilled, World, token_of_message

# Rules that find failures of the current code, being fixed in parallel (issue 9): off until the
# fix is merged. Never weaken an invariant to pass: switch the rule on once its fix lands.
ENABLE_WRONGTYPE_RULE = True  # WRONGTYPE on one key fails its rows only
ENABLE_REUSED_ID_RULE = True  # a reused id raises DuplicateJobError
ENABLE_BINDING_LOSS_RULE = True  # FLUSHALL: Redis loses kombu's binding tables too
ENABLE_MISTYPED_ROW_RULE = True  # valid JSON, a field of the wrong type
ENABLE_CANVAS_RULE = True  # chain / link continuations

FUZZ_EXAMPLES = int(os.environ.get("RELIABLE_JOB_FUZZ_EXAMPLES") or 0)
EXAMPLES = FUZZ_EXAMPLES or 30
STEPS = int(os.environ.get("RELIABLE_JOB_FUZZ_STEPS") or 40)

BATCH_SIZE = 3
MAX_ATTEMPTS = 3
BACKOFF_CAP = 0.001
OUTBOX_SETTINGS: dict[str, Any] = {
    "batch_size": BATCH_SIZE,
    "max_publish_attempts": MAX_ATTEMPTS,
    "backoff_cap": BACKOFF_CAP,  # retries due at once: the model is time-independent
    "completion_interval": 3600.0,  # finished ids wait in the buffer for the "completion flush" rule
}
DRAIN_ROUNDS = 60

# Faults after which a job may run again.
RELAY_KILLED = "relay killed with it in the batch"
WORKER_KILLED = "worker killed while running it"
COMPLETION_LOST = "worker killed with its id buffered"
REVIVED = "retry-dead"
BROKER_LOST = "broker lost its message"  # a reason to run less, never more

F = TypeVar("F", bound=Callable[..., Any])


def tracked(method: F) -> F:
    """Remember that a step failed, so that teardown skips the drain (the failure is reported)."""

    @functools.wraps(method)
    def wrapper(self: OutboxMachine, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return wrapper  # type: ignore[return-value]


@dataclass
class Job:
    """What the model knows of one staged job (one token: the job's only argument)."""

    token: str
    queue: str
    job_id: str
    state: str = "open"  # open | committed | rolled back | refused
    head: str | None = None  # the chain step (or task with the link) that publishes this one
    corrupted: bool = False
    successes: int = 0
    crash_batches: int = 0
    requeues: int = 0
    requeues_this_life: int = 0
    revives: int = 0
    faults: set[str] = field(default_factory=set)


class OutboxMachine(RuleBasedStateMachine):
    world: World
    examples = 0
    stats: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.world.reset()
        self.jobs: dict[str, Job] = {}
        self.by_id: dict[str, str] = {}
        self.session: Session | None = None
        self.open: list[str] = []
        self.dirty = False
        self.broken: dict[str, list[bytes]] = {}
        self.failed = False
        self.queued_before: Counter[str] = Counter()
        self.killed_batch: set[str] = set()
        self.relay, self.broker = self.world.new_relay(self._published)
        self.sqlite = self.world.engine.dialect.name == "sqlite"

    # -- helpers -------------------------------------------------------------------------------

    def _token(self) -> str:
        return f"t{len(self.jobs)}"

    def _session(self) -> Session:
        if self.session is None:
            self.session = Session(self.world.engine)
            self.session.connection()  # in a transaction from now on (the provider joins it)
        return self.session

    def _db_free(self) -> bool:
        """SQLite has one writer: nothing else writes while the open transaction holds the lock."""
        return not (self.sqlite and self.dirty)

    def _add(self, job: Job) -> Job:
        self.jobs[job.token] = job
        self.by_id[job.job_id] = job.token
        self.open.append(job.token)
        self.dirty = True
        return job

    def _stage(self, queue: str, how: str, task_id: str | None = None) -> Job:
        session = self._session()
        token = self._token()
        task = self.world.task(queue)
        options = {"task_id": task_id} if task_id else {}
        if how == "option":
            result = task.apply_async((token,), reliable_job_session=session, **options)
        elif how == "bind":
            with reliable_job.bind(session):
                result = task.apply_async((token,), **options)
        else:
            self.world.provider_session = session
            try:
                result = task.apply_async((token,), **options)
            finally:
                self.world.provider_session = None
        assert task_id is None or result.id == task_id
        return self._add(Job(token, queue, result.id))

    def _token_of_row(self, row: dict[str, Any]) -> str | None:
        return token_of_message(row["message"]) or self.by_id.get(row["job_id"])

    def _token_of_claimed(self, row: ClaimedRow) -> str | None:
        return token_of_message(row.message) or self.by_id.get(row.job_id)

    def _queued_tokens(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for queue in QUEUES:
            for raw in [*self.world.queued(queue), *self.broken.get(queue, [])]:
                token = token_of_message(raw.decode())
                if token is not None:
                    found[token] += 1
        return found

    def _quiet_broker(self) -> bool:
        """Nothing queued (broken keys' messages included) and no finished id waiting: the state
        in which the README's ``redeliver_after`` is meant to expire."""
        return not self._queued_tokens() and not self.world.buffered()

    def _published(self, rows: list[ClaimedRow], killed: bool) -> None:
        """Called by the relay's broker after each publish, before the claim commits."""
        assert len(rows) <= BATCH_SIZE, "a pass published more than one batch"
        after = self._queued_tokens()
        for row in rows:
            token = self._token_of_claimed(row)
            if token is None:
                continue
            assert after[token] > self.queued_before[token], (
                f"job {token} ({row.job_id}) reported published but no new message is in Redis"
            )
            if killed:
                self.killed_batch.add(token)
                job = self.jobs[token]
                job.crash_batches += 1
                job.faults.add(RELAY_KILLED)

    def _relay_pass(self, *, kill: bool = False) -> int:
        self.queued_before = self._queued_tokens()
        self.broker.kill_after_publish = kill
        try:
            return self.relay.run_once()
        except BrokerUnavailable as exc:  # Redis is up all along in this model: never an outage
            raise AssertionError(
                f"the relay took a broker error for an outage (every queue stalls): {exc}"
            ) from exc

    # -- staging -------------------------------------------------------------------------------

    @rule(
        queue=st.sampled_from(QUEUES),
        how=st.sampled_from(["option", "bind", "provider"]),
        commit=st.booleans(),
    )
    @tracked
    def stage(self, queue: str, how: str, commit: bool) -> None:
        """Stage a job in the open transaction (begun if none is); with ``commit``, commit it at
        once (a short request)."""
        self._stage(queue, how)
        if commit:
            self.commit()

    @rule(
        queue=st.sampled_from(QUEUES),
        count=st.integers(1, 2),
        release=st.booleans(),
        how=st.sampled_from(["option", "bind", "provider"]),
    )
    @tracked
    def stage_in_savepoint(self, queue: str, count: int, release: bool, how: str) -> None:
        savepoint = self._session().begin_nested()
        staged = [self._stage(queue, how) for _ in range(count)]
        if release:
            savepoint.commit()
            return
        savepoint.rollback()
        for job in staged:
            job.state = "rolled back"
            self.open.remove(job.token)

    @rule(queue=st.sampled_from(QUEUES), finished=st.booleans())
    @tracked
    def stage_explicit_id(self, queue: str, finished: bool) -> None:
        """A fresh id of the caller's, or the id of a job that is finished (ran, row deleted, no
        message or buffered completion left): both are new jobs and must run."""
        task_id = f"explicit-{self.world.prefix}-{len(self.jobs)}"
        if finished:
            in_outbox = {row["job_id"] for row in self.world.rows()}
            queued = set(self._queued_tokens())
            buffered = set(self.world.buffered())
            done = [
                job.job_id
                for job in self.jobs.values()
                if job.state == "committed"
                and job.successes
                and job.job_id not in in_outbox
                and job.job_id not in buffered
                and not any(self.jobs[t].job_id == job.job_id for t in queued | set(self.open))
            ]
            if done:
                task_id = done[0]
        self._stage(queue, "option", task_id)

    @rule(queue=st.sampled_from(QUEUES), pick=st.integers(0, 255))
    @tracked
    def stage_reused_id(self, queue: str, pick: int) -> None:
        """An id still in the outbox (any state) or staged earlier in this transaction: refused
        with a ReliableJobError that leaves the transaction usable (or, if accepted, it must run).

        A chain tail's id is not "staged" until its head hands it off: it travels inside the
        head's message. Taking it for another job is a collision of the caller's making (Celery
        made the id), and the hand-off then keeps the row already there (a rerun's, as far as it
        can tell): so such ids are not picked here (the documented edge, see README Guarantees)."""
        if not ENABLE_REUSED_ID_RULE:
            return
        staged_now = {self.jobs[t].job_id for t in self.open if self.jobs[t].head is None}
        present = {row["job_id"] for row in self.world.rows()} | staged_now
        ids = list(dict.fromkeys(job.job_id for job in self.jobs.values() if job.job_id in present))
        if not ids:
            return
        task_id = ids[pick % len(ids)]
        session = self._session()
        token = self._token()
        try:
            self.world.task(queue).apply_async((token,), reliable_job_session=session, task_id=task_id)
        except ReliableJobError:
            self.jobs[token] = Job(token, queue, task_id, state="refused")
            session.execute(text("SELECT 1"))  # the caller's transaction is still usable
            self.dirty = True
            return
        self._add(Job(token, queue, task_id))

    @rule(link=st.booleans(), head_queue=st.sampled_from(QUEUES), tail_queue=st.sampled_from(QUEUES))
    @tracked
    def stage_canvas(self, link: bool, head_queue: str, tail_queue: str) -> None:
        """``chain(a.si(), b.si())`` or ``a.si().apply_async(link=b.si())``: the first step is
        staged now; the worker publishes the second once the first succeeded."""
        if not ENABLE_CANVAS_RULE:
            return
        session = self._session()
        head, tail = self._token(), f"t{len(self.jobs)}b"
        with reliable_job.bind(session):
            head_sig = self.world.task(head_queue).si(head)
            tail_sig = self.world.task(tail_queue).si(tail)
            if link:
                tail_id = tail_sig.freeze().id
                head_id = head_sig.apply_async(link=tail_sig).id
            else:
                result = chain(head_sig, tail_sig).apply_async()
                tail_id, head_id = result.id, result.parent.id
        self._add(Job(head, head_queue, head_id))
        self._add(Job(tail, tail_queue, tail_id, head=head))

    @rule()
    @tracked
    def commit(self) -> None:
        if self.session is None:
            return
        self.session.commit()
        self.session.close()
        self.session = None
        for token in self.open:
            self.jobs[token].state = "committed"
        self.open, self.dirty = [], False

    @rule()
    @tracked
    def rollback(self) -> None:
        if self.session is None:
            return
        self.session.rollback()
        self.session.close()
        self.session = None
        for token in self.open:
            self.jobs[token].state = "rolled back"
        self.open, self.dirty = [], False

    # -- the relay -----------------------------------------------------------------------------

    @rule()
    @tracked
    def relay_pass(self) -> None:
        if self._db_free():
            self._relay_pass()

    @rule()
    @tracked
    def relay_killed_between_publish_and_commit(self) -> None:
        """The broker took the batch, then the relay died before COMMIT: the rows are pending
        again while their messages are in Redis; a new relay (new connection) takes over."""
        if not self._db_free():
            return
        self.killed_batch = set()
        try:
            self._relay_pass(kill=True)
        except RelayKilled:
            pass
        self.broker.close()
        self.relay, self.broker = self.world.new_relay(self._published)
        for row in self.world.rows():
            token = self._token_of_row(row)
            assert token not in self.killed_batch or row["state"] == PENDING, (
                f"job {token} of the killed relay's batch is {row['state']}, not pending again"
            )

    # -- the broker ----------------------------------------------------------------------------

    @rule(everything=st.booleans())
    @tracked
    def broker_loses_data(self, everything: bool) -> None:
        """Redis loses the queues' messages (eviction, a restart without persistence); with
        ``everything``, kombu's binding tables too (FLUSHALL)."""
        for token in self._queued_tokens():
            self.jobs[token].faults.add(BROKER_LOST)
        if everything and ENABLE_BINDING_LOSS_RULE:
            self.world.delete_keys()
            self.broken.clear()
            return
        for queue in QUEUES:
            if queue in self.broken:
                self.broken[queue] = []
            else:
                self.world.redis.delete(self.world.queue(queue))

    @rule(queue=st.sampled_from(QUEUES))
    @tracked
    def broker_refuses_one_key(self, queue: str) -> None:
        """The queue's key holds a string: every LPUSH to it fails with WRONGTYPE (like OOM or
        MISCONF for one command). Its messages are kept aside until the repair."""
        if not ENABLE_WRONGTYPE_RULE or queue in self.broken:
            return
        key = self.world.queue(queue)
        self.broken[queue] = self.world.queued(queue)
        self.world.redis.delete(key)
        self.world.redis.set(key, "not a list")

    @rule(queue=st.sampled_from(QUEUES))
    @tracked
    def broker_repaired(self, queue: str) -> None:
        self._repair(queue)

    def _repair(self, queue: str) -> None:
        saved = self.broken.pop(queue, None)
        if saved is None:
            return
        key = self.world.queue(queue)
        self.world.redis.delete(key)
        if saved:
            self.world.redis.rpush(key, *saved)

    # -- the database --------------------------------------------------------------------------

    @rule(mistyped=st.booleans(), pick=st.integers(0, 255))
    @tracked
    def corrupt_a_pending_row(self, mistyped: bool, pick: int) -> None:
        """An operator or a bug writes a message the relay cannot publish: garbage, or (with
        ``mistyped``) valid JSON with a field of the wrong type."""
        if not self._db_free() or (mistyped and not ENABLE_MISTYPED_ROW_RULE):
            return
        pending = sorted(
            (row["id"], row["message"], row["job_id"]) for row in self.world.rows() if row["state"] == PENDING
        )
        if not pending:
            return
        row_id, message, job_id = pending[pick % len(pending)]
        token = token_of_message(message) or self.by_id[job_id]
        corrupt = "{not json"
        if mistyped and token_of_message(message) is not None:  # (not already garbage)
            doc = json.loads(message)
            doc["priority"] = {"high": [1, "x"]}
            corrupt = json.dumps(doc)
        t = self.world.table
        with self.world.engine.begin() as conn:
            conn.execute(update(t).where(t.c.id == row_id).values(message=corrupt))
        self.jobs[token].corrupted = True

    @rule()
    @tracked
    def redelivery_sweep(self) -> None:
        """``redeliver_after`` has passed (``older_than=0``): allowed only once the workers have
        taken everything queued and completion flushed, as the README asks of ``redeliver_after``."""
        if self._db_free() and self._quiet_broker():
            self._sweep()

    def _sweep(self) -> None:
        sent = {row["id"]: self._token_of_row(row) for row in self.world.rows() if row["state"] == SENT}
        self.world.store.requeue_unfinished(0, MAX_ATTEMPTS)
        for row in self.world.rows():
            token = sent.get(row["id"])
            if token is None or row["state"] != PENDING:
                continue
            job = self.jobs[token]
            job.requeues += 1
            job.requeues_this_life += 1
            assert job.requeues_this_life <= MAX_ATTEMPTS - 1, (
                f"job {token} redelivered {job.requeues_this_life} times, more than "
                f"max_publish_attempts={MAX_ATTEMPTS} deliveries"
            )

    @rule()
    @tracked
    def retry_dead(self) -> None:
        if self._db_free():
            self._retry_dead()

    def _retry_dead(self) -> None:
        dead = [self._token_of_row(row) for row in self.world.rows() if row["state"] == DEAD]
        self.world.store.retry_dead()
        for token in dead:
            if token is not None:
                job = self.jobs[token]
                job.revives += 1
                job.requeues_this_life = 0
                job.faults.add(REVIVED)

    # -- workers -------------------------------------------------------------------------------

    def _run_one(self, queue: str) -> bool:
        popped = self.world.pop(queue)
        if popped is None:
            return False
        assert popped.token is not None, f"undecodable message in Redis: {popped.raw!r}"
        ok = self.world.run(popped)
        if ok:
            self.jobs[popped.token].successes += 1
        return True

    @rule(queue=st.sampled_from(QUEUES))
    @tracked
    def worker_runs_a_job(self, queue: str) -> None:
        if self._db_free():  # a chain step is staged from the worker (SQLite: one writer)
            self._run_one(queue)

    @rule(queue=st.sampled_from(QUEUES))
    @tracked
    def worker_killed_mid_job(self, queue: str) -> None:
        """The task started (it may have done its work) and the worker died: no completion."""
        popped = self.world.pop(queue)
        if popped is None or popped.token is None:
            return
        self.world.runs.append(popped.token)
        self.jobs[popped.token].faults.add(WORKER_KILLED)

    @rule()
    @tracked
    def completion_flush(self) -> None:
        if self._db_free():
            self.world.runtime.completion.flush()

    @rule()
    @tracked
    def worker_killed_with_completions_buffered(self) -> None:
        for job_id in self.world.drop_buffered():
            token = self.by_id.get(job_id)
            if token is not None:
                self.jobs[token].faults.add(COMPLETION_LOST)

    # -- invariants ----------------------------------------------------------------------------

    def _allowance(self, job: Job) -> int:
        extra = job.crash_batches + job.requeues + job.revives
        if job.head is not None:
            extra += max(0, self.jobs[job.head].successes - 1)
        return 1 + extra

    def _may_duplicate(self, job: Job) -> bool:
        if job.faults - {BROKER_LOST}:
            return True
        return job.head is not None and self.jobs[job.head].successes > 1

    @invariant()
    def only_committed_jobs_run(self) -> None:
        for token in set(self.world.runs):
            job = self.jobs[token]
            assert job.state == "committed", f"job {token} ran while its transaction is {job.state}"

    @invariant()
    def duplicates_only_after_a_fault_and_bounded(self) -> None:
        for token, runs in Counter(self.world.runs).items():
            if runs < 2:
                continue
            job = self.jobs[token]
            assert self._may_duplicate(job), f"job {token} ran {runs} times with no fault injected"
            allowed = self._allowance(job)
            assert runs <= allowed, (
                f"job {token} ran {runs} times; allowed {allowed} (relay kills {job.crash_batches}, "
                f"redeliveries {job.requeues}, retry-dead {job.revives}, faults {sorted(job.faults)})"
            )

    # -- the end -------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.failed:
                self.rollback()  # an example may end with its transaction open: it never commits
                self._drain()
                self._check_the_end()
        finally:
            if self.session is not None:
                self.session.close()
            self.broker.close()

    def _drain(self) -> None:
        for queue in list(self.broken):
            self._repair(queue)
        self.broker.close()
        self.relay, self.broker = self.world.new_relay(self._published)  # reconnects, re-declares
        self._retry_dead()  # what an operator does once the broker is repaired
        for _ in range(DRAIN_ROUNDS):
            time.sleep(BACKOFF_CAP * 2)  # failed rows are due again
            while self._relay_pass() >= BATCH_SIZE:
                pass
            ran = True
            while ran:
                ran = any([self._run_one(queue) for queue in QUEUES])
            self.world.runtime.completion.flush()
            states = Counter(row["state"] for row in self.world.rows())
            if states[PENDING]:
                continue
            if not states[SENT]:
                return
            self._sweep()
        raise AssertionError(f"the outbox did not drain: {Counter(r['state'] for r in self.world.rows())}")

    def _check_the_end(self) -> None:
        stats = type(self).stats
        stats["jobs committed"] += sum(job.state == "committed" for job in self.jobs.values())
        stats["jobs rolled back"] += sum(job.state == "rolled back" for job in self.jobs.values())
        stats["runs"] += len(self.world.runs)
        stats["duplicate runs"] += len(self.world.runs) - len(set(self.world.runs))
        stats["faults"] += sum(len(job.faults) for job in self.jobs.values())
        stats["dead rows at the end"] += len(self.world.rows())
        self.only_committed_jobs_run()
        self.duplicates_only_after_a_fault_and_bounded()
        rows = self.world.rows()
        for row in rows:
            assert row["state"] == DEAD, f"row left {row['state']}: {row['job_id']}"
            assert row["last_error"], f"dead row without an error: {row['job_id']}"
        dead_by_token = {self._token_of_row(row): row for row in rows}
        runs = Counter(self.world.runs)
        for token, job in self.jobs.items():
            if job.state != "committed" or job.corrupted or runs[token]:
                continue
            if job.head is not None and not self.jobs[job.head].successes:
                continue  # the step before it never succeeded: nothing published it
            row = dead_by_token.get(token)
            if row is not None and "not completed" in str(row["last_error"]):
                continue  # delivered max_publish_attempts times, lost every time: dead, documented
            raise AssertionError(f"committed job {token} ({job.job_id}) never ran")
        for token, row in dead_by_token.items():
            job = self.jobs.get(token) if token is not None else None
            assert job is None or job.corrupted or "not completed" in str(row["last_error"]), (
                f"job {token} is dead although it could be published: {row['last_error']}"
            )


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def outbox_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    else:
        url = need("RELIABLE_JOB_TEST_POSTGRES_URL")
    engine = create_outbox_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def world(outbox_engine: Engine) -> Iterator[World]:
    w = World(outbox_engine, need("RELIABLE_JOB_TEST_REDIS_URL"), OUTBOX_SETTINGS)
    yield w
    w.close()


@pytest.mark.timeout(0 if FUZZ_EXAMPLES else 600)
def test_outbox_state_machine(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    machine = type("OutboxMachine", (OutboxMachine,), {"world": world, "examples": 0, "stats": Counter()})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=not FUZZ_EXAMPLES,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    with capsys.disabled():
        print(
            f"\nstate machine on {world.engine.dialect.name}: {machine.examples} examples "
            f"(max_examples={EXAMPLES}, up to {STEPS} steps each): "
            + ", ".join(f"{n} {what}" for what, n in sorted(machine.stats.items()))
        )
