"""Unit tests of reliable_job.signals: connecting, weak receivers, errors swallowed, and where the
core sends them (on the in-memory fakes)."""

from __future__ import annotations

import gc
import logging

import pytest

from reliable_job import Settings, signals
from reliable_job.completion import Completion
from reliable_job.ports import StagedJob
from reliable_job.relay import Relay
from reliable_job.signals import Signal
from reliable_job.staging import Stager
from reliable_job.testing import InMemoryBroker, InMemoryStore


def jobs(n: int) -> list[StagedJob]:
    return [StagedJob(f"job-{i}", f"task-{i % 2}", "celery", f"message-job-{i}") for i in range(n)]


@pytest.fixture
def record():
    """Connect a recorder to every signal; yields the list of (signal name, arguments)."""
    seen: list[tuple[str, dict]] = []

    def receiver(sender, signal, **arguments):
        seen.append((signal.name, arguments))

    for signal in signals.ALL:
        signal.connect(receiver)
    yield seen
    for signal in signals.ALL:
        signal.disconnect(receiver)


def named(seen, name):
    return [arguments for signal, arguments in seen if signal == name]


def test_no_receiver_is_falsy_and_send_does_nothing():
    """The hot paths test ``signal.receivers`` (an empty tuple) before building arguments."""
    signal = Signal("probe")
    assert signal.receivers == () and not signal
    signal.send(object(), anything=1)  # no receiver: nothing happens


def test_a_receiver_that_raises_is_logged_and_the_others_still_run(caplog):
    signal = Signal("probe")
    calls = []

    def broken(sender, **_):
        raise RuntimeError("receiver bug")

    def fine(sender, **arguments):
        calls.append((sender, arguments["value"]))

    signal.connect(broken)
    signal.connect(fine)
    with caplog.at_level(logging.ERROR, logger="reliable_job.signals"):
        signal.send("me", value=3)
    assert calls == [("me", 3)]
    assert "probe signal raised" in caplog.text and "receiver bug" in caplog.text


def test_connect_twice_disconnect_and_weak_receivers():
    signal = Signal("probe")
    calls = []

    def receiver(sender, **_):
        calls.append(sender)

    signal.connect(receiver)
    signal.connect(receiver)
    signal.send(1)
    assert calls == [1]
    assert signal.disconnect(receiver) and not signal.disconnect(receiver)
    signal.send(2)
    assert calls == [1]

    signal.connect(lambda sender, **_: calls.append(sender))  # weak: gone with its last reference
    gc.collect()
    assert not signal
    signal.connect(lambda sender, **_: calls.append(sender), weak=False)
    gc.collect()
    signal.send(3)
    assert calls == [1, 3]


def test_bound_method_receivers_are_weak_by_default():
    signal = Signal("probe")

    class Counter:
        n = 0

        def on(self, sender, **_):
            self.n += 1

    counter = Counter()
    signal.connect(counter.on)
    signal.send(None)
    assert counter.n == 1 and signal
    del counter
    gc.collect()
    assert not signal


def test_staging_sends_job_staged_with_the_batch(record):
    store = InMemoryStore()
    stager = Stager(Settings(), adapt=lambda target, explicit: None, own_transaction=lambda: store)
    stager.stage(jobs(2))
    (sent,) = named(record, "job_staged")
    assert [(job.task_name, job.job_id) for job in sent["jobs"]] == [("task-0", "job-0"), ("task-1", "job-1")]


def test_a_receiver_error_never_breaks_staging_or_the_relay(caplog):
    def broken(sender, **_):
        raise RuntimeError("receiver bug")

    for signal in signals.ALL:
        signal.connect(broken)
    try:
        store = InMemoryStore()
        stager = Stager(Settings(), adapt=lambda target, explicit: None, own_transaction=lambda: store)
        stager.stage(jobs(3))
        relay = Relay(store, InMemoryBroker(), Settings())
        assert relay.run_once() == 3
        assert relay.run_once() == 0
        Completion(store, Settings(completion_interval=0)).succeeded("job-0")
        assert store.status().sent == 2
    finally:
        for signal in signals.ALL:
            signal.disconnect(broken)


def test_relay_sends_one_signal_per_pass(record):
    store = InMemoryStore()
    store.write(jobs(4))
    broker = InMemoryBroker()
    broker.reject = {"message-job-1"}
    relay = Relay(store, broker, Settings(max_publish_attempts=1))
    assert relay.run_once() == 4
    assert relay.run_once() == 0
    (published,) = named(record, "job_published")
    assert [row.job_id for row in published["rows"]] == ["job-0", "job-2", "job-3"]
    (failed,) = named(record, "job_publish_failed")
    assert [row.job_id for row, _error in failed["failures"]] == ["job-1"]
    assert "rejected" in failed["error"]
    assert named(record, "job_dead") == [{"reason": "publish", "count": 1, "job_ids": ["job-1"]}]
    passes = named(record, "relay_pass")
    assert [(p["published"], p["handled"]) for p in passes] == [(3, 4), (0, 0)]
    assert all(p["duration"] >= 0 for p in passes)


def test_completion_sends_outcomes_and_burials(record):
    store = InMemoryStore()
    store.write(jobs(3))
    completion = Completion(store, Settings(completion_interval=0, preserve_dead_jobs=True))
    completion.succeeded("job-0")
    completion.failed("job-1", "boom")
    completion.failed("job-2", "revoked", outcome="revoked")
    outcomes = [(a["outcome"], a["job_ids"]) for a in named(record, "job_completed")]
    assert outcomes == [("succeeded", ["job-0"]), ("failed", ["job-1"]), ("revoked", ["job-2"])]
    dead = named(record, "job_dead")
    assert [(d["reason"], d["job_ids"]) for d in dead] == [
        ("final_failure", ["job-1"]),
        ("final_failure", ["job-2"]),
    ]


def test_recovery_sends_redelivered_and_never_completed(record):
    store = InMemoryStore()
    store.write(jobs(2))
    relay = Relay(store, InMemoryBroker(), Settings(redeliver_after=1, max_publish_attempts=2))
    relay.run_once()
    for row in store.rows.values():
        row.sent_at -= 10
    store.rows[1].attempts = 2  # delivered max_publish_attempts times already
    relay.recovery._next_redelivery = 0
    relay.redeliver_due()
    assert named(record, "job_redelivered") == [{"count": 1, "reason": "redeliver_after"}]
    assert named(record, "job_dead") == [{"reason": "never_completed", "count": 1, "job_ids": None}]
