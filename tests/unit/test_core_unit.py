"""Unit tests of the core (relay, completion, staging resolution, settings) on in-memory fakes."""

from __future__ import annotations

import logging
import threading

import pytest

import reliable_job
from reliable_job import ConfigurationError, Settings
from reliable_job.backoff import backoff_delay
from reliable_job.completion import Completion
from reliable_job.ports import StagedJob
from reliable_job.relay import Relay
from reliable_job.schema import DEAD, PENDING, SENT, validate_table_name
from reliable_job.staging import NotifyThrottle, Stager
from reliable_job.testing import InMemoryBroker, InMemoryStore, InMemoryWakeup


def jobs(n: int, prefix: str = "job") -> list[StagedJob]:
    return [StagedJob(f"{prefix}-{i}", "t", "celery", f"message-{prefix}-{i}") for i in range(n)]


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


def test_relay_publishes_in_batches_and_marks_sent(store, broker):
    """Each pass claims at most one batch, publishes it and marks it sent."""
    store.write(jobs(5))
    relay = Relay(store, broker, Settings(batch_size=2))
    assert [relay.run_once() for _ in range(4)] == [2, 2, 1, 0]
    assert broker.published == [f"message-job-{i}" for i in range(5)]
    assert {r.state for r in store.rows.values()} == {SENT}


def test_broker_down_keeps_rows_pending(store, broker):
    """A broker outage publishes nothing and leaves every row pending."""
    store.write(jobs(3))
    broker.down = True
    relay = Relay(store, broker, Settings())
    with pytest.raises(reliable_job.BrokerUnavailable):
        relay.run_once()
    assert {r.state for r in store.rows.values()} == {PENDING}
    broker.down = False
    assert relay.run_once() == 3


def test_outage_is_logged_once_then_resumed(store, broker, caplog):
    """The relay logs an outage once, not every loop, and logs when it resumes."""
    store.write(jobs(1))
    broker.down = True
    waits: list[float] = []
    relay: Relay

    def wait(event: threading.Event, seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:
            broker.down = False
        if len(waits) >= 7:
            relay.stop()

    relay = Relay(store, broker, Settings(backoff_cap=2.0), wait=wait)
    with caplog.at_level(logging.INFO, logger="reliable_job.relay"):
        relay.run()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("relay paused" in m for m in messages) == 1
    assert sum("relay resumed" in m for m in messages) == 1
    assert broker.published == ["message-job-0"]
    assert max(waits[:5]) <= 2.0, "backoff is capped"
    assert broker.closed == 1


def test_a_row_that_cannot_be_published_goes_dead_and_the_rest_flow(store, broker):
    """A poison row is retried with backoff, then dead, while rows behind it are published."""
    store.write(jobs(3))
    broker.reject = {"message-job-1"}
    relay = Relay(store, broker, Settings(max_publish_attempts=2, backoff_cap=0.01))
    relay.run_once()
    assert broker.published == ["message-job-0", "message-job-2"]
    poison = store.rows[2]
    assert (poison.state, poison.attempts) == (PENDING, 1)
    assert "rejected" in (poison.last_error or "")
    poison.available_at = 0  # its backoff is over
    relay.run_once()
    assert (poison.state, poison.attempts) == (DEAD, 2)
    assert store.retry_dead() == 1
    assert store.rows[2].state == PENDING


def test_stop_finishes_the_batch_in_flight(store, broker):
    """stop() during a pass lets that pass publish and mark its batch before the loop exits."""
    store.write(jobs(4))
    relay = Relay(store, broker, Settings(batch_size=2))
    original = broker.publish

    def publish_then_stop(rows):
        relay.stop()
        return original(rows)

    broker.publish = publish_then_stop  # type: ignore[method-assign]
    relay.run()
    assert [r.state for r in store.rows.values()] == [SENT, SENT, PENDING, PENDING]


def test_concurrent_claims_never_share_a_row(store, broker):
    """Two claims at once get disjoint rows (the SKIP LOCKED contract)."""
    store.write(jobs(4))
    with store.claim(3) as first, store.claim(3) as second:
        assert {r.id for r in first.rows}.isdisjoint(r.id for r in second.rows)
        assert len(first.rows) + len(second.rows) == 4


def test_completion_deletes_or_buries(store):
    """Success deletes the row; final failure deletes it, or keeps it dead when asked to."""
    store.write(jobs(3))
    Completion(store, Settings(completion_interval=0)).succeeded("job-0")
    Completion(store, Settings(completion_interval=0)).failed("job-1", "boom")
    Completion(store, Settings(completion_interval=0, preserve_dead_jobs=True)).failed(
        "job-2", "ValueError: boom"
    )
    assert [(r.job.job_id, r.state, r.last_error) for r in store.rows.values()] == [
        ("job-2", DEAD, "ValueError: boom")
    ]


def test_completion_never_raises(caplog):
    """A failed delete is logged and never fails the task."""

    class Broken(InMemoryStore):
        def complete_many(self, job_ids) -> int:
            raise RuntimeError("database gone")

    Completion(Broken(), Settings(completion_interval=0)).succeeded("x")
    assert "could not delete" in caplog.text


class CountingStore(InMemoryStore):
    """Records every delete call; ``fail`` makes complete_many raise."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = False
        self.flushed = threading.Event()

    def complete_many(self, job_ids) -> int:
        self.calls.append(("complete_many", list(job_ids)))
        try:
            if self.fail:
                raise RuntimeError("database gone")
            return super().complete_many(job_ids)
        finally:
            self.flushed.set()


def remaining(store: InMemoryStore) -> list[str]:
    return [r.job.job_id for r in store.rows.values()]


def test_completion_interval_0_deletes_synchronously():
    """interval 0: one delete per finished job, at once, no thread."""
    store = CountingStore()
    store.write(jobs(2))
    completion = Completion(store, Settings(completion_interval=0))
    completion.succeeded("job-0")
    completion.failed("job-1", "boom")
    assert remaining(store) == []
    assert store.calls == [("complete_many", ["job-0"]), ("complete_many", ["job-1"])]
    assert completion.flusher is None


def test_completion_batches_deletes_per_interval_and_per_batch_size():
    """Ids wait for the interval (long here) and go in one statement as soon as a batch is full;
    close() deletes the rest. Dead jobs are still buried at once."""
    store = CountingStore()
    store.write(jobs(7))
    completion = Completion(store, Settings(completion_interval=60, preserve_dead_jobs=True), batch=3)
    completion.succeeded("job-0")
    completion.succeeded("job-1")
    assert store.calls == [] and len(remaining(store)) == 7, "waiting for the interval"
    completion.failed("job-6", "ValueError: x")  # buried synchronously
    assert store.rows[7].state == DEAD and store.calls == []
    completion.succeeded("job-2")  # a full batch: flushed without waiting for the interval
    assert store.flushed.wait(10)
    assert store.calls == [("complete_many", ["job-0", "job-1", "job-2"])]
    completion.succeeded("job-3")
    completion.succeeded("job-4")
    completion.close()
    assert store.calls[1:] == [("complete_many", ["job-3", "job-4"])]
    assert remaining(store) == ["job-5", "job-6"]
    assert not completion.flusher_running


def test_completion_flushes_after_the_interval():
    store = CountingStore()
    store.write(jobs(2))
    completion = Completion(store, Settings(completion_interval=0.01))
    completion.succeeded("job-0")
    completion.failed("job-1", "boom")  # dead jobs not preserved: batched like a success
    assert store.flushed.wait(10)
    completion.close()
    assert remaining(store) == []
    assert [ids for _, ids in store.calls] in ([["job-0", "job-1"]], [["job-0"], ["job-1"]])


def test_completion_keeps_failed_ids_for_the_next_flush_and_caps_the_buffer(caplog):
    """A failed flush is logged, never raised; its ids are retried at the next flush. Beyond
    max_buffered the oldest ids are dropped with a warning (redelivered later, never lost)."""
    store = CountingStore()
    store.write(jobs(6))
    store.fail = True
    completion = Completion(store, Settings(completion_interval=60), batch=2, max_buffered=4)
    completion.close = lambda timeout=10.0: None  # type: ignore[method-assign]  # no atexit flush
    completion.succeeded("job-0")
    completion.succeeded("job-1")  # full batch -> flush fails
    assert store.flushed.wait(10)
    wait = threading.Event()
    for _ in range(1000):
        if completion.pending() == ["job-0", "job-1"]:
            break
        wait.wait(0.01)
    assert completion.pending() == ["job-0", "job-1"], "given back, in order"
    assert "could not delete the outbox rows of 2 finished jobs" in caplog.text
    store.fail = False
    for i in (2, 3, 4):
        completion.succeeded(f"job-{i}")
    # Stop the thread without Completion.close (replaced above), then flush by hand.
    completion.stop_flusher(10)
    assert not completion.flusher_running
    assert "completion buffer full" in caplog.text
    assert completion.pending() == ["job-1", "job-2", "job-3", "job-4"], "oldest dropped"
    assert completion.flush() == 4
    assert remaining(store) == ["job-0", "job-5"]


def test_completion_buffer_belongs_to_the_process_that_filled_it():
    """After a fork (simulated: another pid) the child starts an empty buffer and a flusher of
    its own, and never deletes the ids its parent had buffered."""
    store = CountingStore()
    store.write(jobs(4))
    pid = [100]
    completion = Completion(store, Settings(completion_interval=60), getpid=lambda: pid[0])
    completion.succeeded("job-0")
    completion.succeeded("job-1")
    parent_thread = completion.flusher
    pid[0] = 200  # the child
    assert completion.pending() == []
    assert completion.flush() == 0 and store.calls == [], "never flushes the parent's ids"
    completion.succeeded("job-2")
    assert completion.pending() == ["job-2"]
    assert completion.flusher is not parent_thread
    completion.close()
    assert store.calls == [("complete_many", ["job-2"])]
    assert remaining(store) == ["job-0", "job-1", "job-3"]
    parent_thread.join(10)
    assert not parent_thread.is_alive(), "the parent's flusher saw it is not its process"


def test_completion_buffer_after_a_real_fork():
    """A real fork: the child's flush deletes only its own ids, the parent's stay buffered."""
    import os

    store = CountingStore()
    store.write(jobs(3))
    completion = Completion(store, Settings(completion_interval=60))
    completion.succeeded("job-0")
    child = os.fork()
    if child == 0:
        try:
            ok = completion.pending() == []
            completion.succeeded("job-1")
            ok = ok and completion.pending() == ["job-1"] and completion.flush() == 1
            ok = ok and remaining(store) == ["job-0", "job-2"]
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert completion.pending() == ["job-0"]
    completion.close()
    assert remaining(store) == ["job-1", "job-2"]


def test_stager_prefers_explicit_then_implicit_then_own_transaction():
    """Explicit binding wins; an implicit session counts only inside a transaction."""
    written: list[str] = []

    class Writer:
        def __init__(self, name: str) -> None:
            self.name = name

        def write(self, staged):
            written.append(self.name)

    def adapt(target, explicit):
        if not explicit and target == "idle session":
            return None
        return Writer(f"{target}/{'explicit' if explicit else 'implicit'}")

    current = {"session": "idle session"}
    stager = Stager(
        Settings(session=lambda: current["session"]), adapt=adapt, own_transaction=lambda: Writer("own")
    )
    stager.stage(jobs(1))
    current["session"] = "busy session"
    stager.stage(jobs(1))
    with reliable_job.bind("bound"):
        stager.stage(jobs(1))
    stager.stage(jobs(1), target="passed")
    assert written == ["own", "busy session/implicit", "bound/explicit", "passed/explicit"]


def test_settings_from_environment_and_code():
    """RELIABLE_JOB_* variables configure; code wins; bad values are clear errors."""
    env = {
        "RELIABLE_JOB_ENABLE_FOR_ALL_JOBS": "true",
        "RELIABLE_JOB_BATCH_SIZE": "50",
        "RELIABLE_JOB_POLL_INTERVAL": "0.5",
        "RELIABLE_JOB_TABLE_NAME": "jobs_outbox",
    }
    settings = Settings.from_env(env, batch_size=10)
    assert (
        settings.enable_for_all_jobs,
        settings.batch_size,
        settings.poll_interval,
        settings.table_name,
    ) == (True, 10, 0.5, "jobs_outbox")
    with pytest.raises(ConfigurationError, match="RELIABLE_JOB_BATCH_SIZE"):
        Settings.from_env({"RELIABLE_JOB_BATCH_SIZE": "many"})
    with pytest.raises(ConfigurationError, match="unknown"):
        Settings.from_env({}, batch=3)
    with pytest.raises(ConfigurationError, match="invalid table name"):
        Settings(table_name="outbox; DROP TABLE users")


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", 'x"', "a" * 52])
def test_table_names_are_plain_identifiers(name):
    """Table names are validated as identifiers: no SQL is built from unchecked strings."""
    with pytest.raises(ConfigurationError):
        validate_table_name(name)


def test_backoff_grows_and_is_capped():
    """Backoff doubles per attempt, never exceeds the cap, and is jittered."""
    assert all(backoff_delay(1, base=1, cap=10) <= 1 for _ in range(50))
    assert all(2 <= backoff_delay(3, base=1, cap=10) <= 4 for _ in range(50))
    assert all(backoff_delay(30, base=1, cap=10) <= 10 for _ in range(50))
    assert len({backoff_delay(5, base=1, cap=100) for _ in range(20)}) > 1


def test_unfinished_jobs_are_published_again_then_buried(store, broker):
    """A sent job that never completes is requeued after redeliver_after, and dead after N deliveries."""
    clock = [0.0]
    store.write(jobs(1))
    relay = Relay(store, broker, Settings(redeliver_after=10, max_publish_attempts=2), clock=lambda: clock[0])
    relay.run_once()
    row = store.rows[1]
    relay.redeliver_due()
    assert row.state == SENT, "not yet stale"
    row.sent_at -= 11
    clock[0] += 2
    relay.redeliver_due()
    assert row.state == PENDING
    relay.run_once()
    assert broker.published == ["message-job-0"] * 2 and row.attempts == 2
    row.sent_at -= 11
    clock[0] += 2
    relay.redeliver_due()
    assert row.state == DEAD


def test_redelivery_waits_for_the_eta(store, broker):
    """A countdown/eta job is not redelivered before its eta plus redeliver_after."""
    from datetime import datetime, timedelta, timezone

    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    store.write([StagedJob("later", "t", "celery", "m", eta)])
    relay = Relay(store, broker, Settings(redeliver_after=10), clock=lambda: 1e9)
    relay.run_once()
    store.rows[1].sent_at -= 100
    relay.redeliver_due()
    assert store.rows[1].state == SENT


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Generous waits for behaviour (a relay thread doing something), never timing asserts."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start(relay: Relay) -> threading.Thread:
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return thread


def test_a_notification_wakes_a_relay_with_a_long_poll_interval(store, broker):
    """Idle with poll_interval=30 s, the relay publishes a job as soon as it is notified; stop()
    ends its wait at once."""
    wakeup = InMemoryWakeup()
    relay = Relay(store, broker, Settings(poll_interval=30), listen=lambda: wakeup)
    thread = start(relay)
    wait_until(lambda: relay.listening)
    store.write(jobs(1))
    wakeup.notify()
    wait_until(lambda: broker.published == ["message-job-0"])
    assert relay.wakeups == 1
    relay.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert wakeup.closed


def test_without_notifications_a_busy_relay_polls_quickly_then_slowly(store, broker):
    """After a pass that found rows the relay polls every hot_poll for hot_window seconds, so a
    job staged without a notification is still picked up; then it waits poll_interval."""
    waits: list[float] = []
    now = [0.0]

    def wait(event, seconds):
        waits.append(seconds)
        now[0] += seconds
        if len(waits) > 300:
            relay.stop()

    relay = Relay(
        store,
        broker,
        Settings(poll_interval=30, hot_poll=0.01),
        hot_window=1.0,
        wait=wait,
        clock=lambda: now[0],
    )
    store.write(jobs(1))
    relay.run()
    assert broker.published == ["message-job-0"]
    assert waits[:99] == [0.01] * 99
    assert waits[-1] == 30


def test_a_listening_relay_backs_off_its_hot_polls_until_rows_or_a_notification(store, broker):
    """Listening, a hot relay's waits double from hot_poll up to poll_interval while its passes
    find nothing, and start over at hot_poll after a pass that found rows or a notification:
    a job staged without a notification (the throttle) is still found, by a later pass."""
    now = [0.0]
    waits: list[float] = []

    class RecordingWakeup(InMemoryWakeup):
        def wait(self, timeout: float) -> bool:
            waits.append(timeout)
            now[0] += timeout
            if len(waits) == 4:
                store.write(jobs(1, "unannounced"))  # staged, no notification
            if len(waits) == 12:
                return True  # a notification
            if len(waits) > 20:
                relay.stop()
            return False

    wakeup = RecordingWakeup()
    relay = Relay(
        store,
        broker,
        Settings(poll_interval=0.64, hot_poll=0.01),
        listen=lambda: wakeup,
        hot_window=100.0,
        clock=lambda: now[0],
    )
    store.write(jobs(1))
    relay.run()
    assert broker.published == ["message-job-0", "message-unannounced-0"]
    assert waits[:4] == [0.01, 0.01, 0.02, 0.04]  # the first wait opens the listener
    assert waits[4:12] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 0.64]
    assert waits[12:15] == [0.01, 0.02, 0.04]


def test_a_relay_that_cannot_listen_polls_and_says_so(store, broker, caplog):
    """A failure to LISTEN (or a lost listening connection) falls back to polling, with a log
    line; the relay listens again later."""
    attempts: list[InMemoryWakeup] = []

    def listen():
        if not attempts:
            attempts.append(InMemoryWakeup())
            raise ConnectionError("LISTEN refused (fake)")
        wakeup = InMemoryWakeup()
        attempts.append(wakeup)
        return wakeup

    relay = Relay(store, broker, Settings(poll_interval=0.01), listen=listen, listen_retry=0.05)
    with caplog.at_level(logging.WARNING, logger="reliable_job.relay"):
        thread = start(relay)
        store.write(jobs(2))
        wait_until(lambda: len(broker.published) == 2)
        wait_until(lambda: relay.listening)
        attempts[-1].broken = True
        wait_until(lambda: len(attempts) == 3 and relay.listening)
        store.write(jobs(1, "later"))
        wait_until(lambda: len(broker.published) == 3)
        relay.stop()
        thread.join(timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot listen" in m for m in messages) == 1
    assert sum("stopped listening" in m for m in messages) == 1
    assert sum("listening for new jobs again" in m for m in messages) == 2


def test_notify_throttle_allows_one_wakeup_per_interval():
    """Staging notifies at most once per interval from one process."""
    now = [100.0]
    throttle = NotifyThrottle(0.05, clock=lambda: now[0])
    assert throttle.due()
    assert not throttle.due()
    now[0] += 0.049
    assert not throttle.due()
    now[0] += 0.002
    assert throttle.due()
    stager = Stager(Settings(listen_notify=False), adapt=lambda t, e: None, own_transaction=lambda: None)  # type: ignore[arg-type,return-value]
    assert not stager.notify_due(), "no throttle: wake-ups are off"
