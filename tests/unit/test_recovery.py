"""The loss check and the backstop (reliable_job.recovery) on the in-memory fakes."""

from __future__ import annotations

from reliable_job.ports import Whereabouts
from reliable_job.relay import Relay
from reliable_job.settings import Settings
from reliable_job.testing import InMemoryBroker, InMemoryStore
from tests.integration.test_store_contract import job


class LocatingBroker(InMemoryBroker):
    """A fake broker that says where messages are: ``where`` by job id (default missing)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[str, str] = {}
        self.taken_over: list[str] = []

    def locate(self, rows, *, take_over):
        found = {}
        for row in rows:
            where = self.where.get(row.job_id, Whereabouts.MISSING)
            if take_over and where == Whereabouts.HELD and row.job_id not in self.taken_over:
                self.taken_over.append(row.job_id)
                where = Whereabouts.TAKEN
            found[row.id] = where
        return found


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _relay(store, broker, clock, **settings):
    values = {"lost_check_after": 10.0, "redeliver_after": 0.0, **settings}
    return Relay(store, broker, Settings(**values), clock=clock)


def _publish_and_age(store, relay, jobs, seconds):
    store.write(jobs)
    relay.run_once()
    for row in store.rows.values():
        row.sent_at -= seconds


def test_a_missing_message_is_republished_after_two_checks_a_queued_one_never():
    store, broker, clock = InMemoryStore(), LocatingBroker(), Clock()
    relay = _relay(store, broker, clock)
    _publish_and_age(store, relay, [job(0), job(1), job(2), job(3)], 60)
    broker.where = {"job-1": Whereabouts.QUEUED, "job-2": Whereabouts.HELD, "job-3": Whereabouts.STARTED}
    clock.now += 10
    relay.check_lost()
    assert store.status().pending == 0, "missing once: maybe between a pop and its bookkeeping"
    relay.check_lost()
    assert store.status().pending == 0, "not due yet: checks run every few seconds"
    clock.now += relay.recovery.check_every
    relay.check_lost()
    assert [r.job.job_id for r in store.rows.values() if r.state == "pending"] == ["job-0"]
    assert relay.recovery.recovered == 1


def test_a_message_found_again_is_no_longer_suspect():
    store, broker, clock = InMemoryStore(), LocatingBroker(), Clock()
    relay = _relay(store, broker, clock)
    _publish_and_age(store, relay, [job(0)], 60)
    clock.now += 10
    relay.check_lost()
    broker.where = {"job-0": Whereabouts.HELD}  # the worker recorded it meanwhile
    clock.now += relay.recovery.check_every
    relay.check_lost()
    broker.where = {}
    clock.now += relay.recovery.check_every
    relay.check_lost()
    assert store.status().pending == 0, "missing once since it was found: not yet"


def test_the_backstop_leaves_queued_and_restored_messages_and_takes_held_ones():
    store, broker, clock = InMemoryStore(), LocatingBroker(), Clock()
    relay = _relay(store, broker, clock, lost_check_after=0.0, redeliver_after=30.0)
    _publish_and_age(store, relay, [job(0), job(1), job(2), job(3)], 60)
    broker.where = {"job-1": Whereabouts.QUEUED, "job-2": Whereabouts.HELD, "job-3": Whereabouts.STARTED}
    broker.taken_over.append("job-2")  # kombu restored it first: HDEL found nothing
    relay.redeliver_due()
    pending = sorted(r.job.job_id for r in store.rows.values() if r.state == "pending")
    assert pending == ["job-0", "job-3"], "lost, or running longer than redeliver_after"


def test_the_backstop_takes_a_held_message_over():
    store, broker, clock = InMemoryStore(), LocatingBroker(), Clock()
    relay = _relay(store, broker, clock, lost_check_after=0.0, redeliver_after=30.0)
    _publish_and_age(store, relay, [job(0)], 60)
    broker.where = {"job-0": Whereabouts.HELD}
    relay.redeliver_due()
    assert broker.taken_over == ["job-0"]
    assert store.status().pending == 1


def test_without_a_locator_redelivery_is_as_before():
    store, clock = InMemoryStore(), Clock()
    relay = _relay(store, InMemoryBroker(), clock, redeliver_after=30.0)
    _publish_and_age(store, relay, [job(0)], 60)
    assert not relay.recovery.available
    relay.check_lost()
    relay.redeliver_due()
    assert store.status().pending == 1
