"""End to end: standalone relay processes under crashes (SIGKILL), concurrency (two relays on one
table) and shutdown signals (SIGTERM, SIGINT)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter

import redis as redis_lib
from sqlalchemy import select

from tests.conftest import count_rows, stage_records, wait_for

QUEUE = "celery"


def queued_ids(redis_url: str) -> list[str]:
    """The task ids of the messages waiting in the Redis queue, in queue order."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return [json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)]
    finally:
        client.close()


def states(engine, outbox) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(state for (state,) in conn.execute(select(outbox.c.state)))


def job_ids_in_state(engine, outbox, state: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(outbox.c.job_id).where(outbox.c.state == state)).scalars())


def started(services, proc) -> bool:
    assert proc.poll() is None, services.log(proc)
    return "relay started" in services.log(proc)


def run_worker_until_done(services, engine, outbox, ids: list[str]) -> Counter[str]:
    """Start a worker (its relay off), wait until every job ran and every row is gone."""
    worker = services.worker(relay=False)
    wait_for(
        lambda: set(services.runs()) >= set(ids),
        timeout=120,
        interval=0.5,
        message=f"all {len(ids)} jobs to run",
    )
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=60, interval=0.2, message="every row deleted")
    runs = services.runs()
    services.stop(worker)
    return runs


def test_relays_killed_mid_batch_lose_nothing(services, celery_app, engine, outbox, redis_url):
    """Standalone relays SIGKILLed at random instants lose no job; a later relay publishes the rest,
    with at most one batch published twice per kill."""
    total, batch, kills = 1500, 10, 4
    ids = stage_records(engine, "k", total)
    interrupted = 0
    for _ in range(kills):
        relay = services.relay(RELIABLE_JOB_BATCH_SIZE=str(batch))
        wait_for(lambda: started(services, relay), message="relay started")
        time.sleep(random.uniform(0.05, 0.3))
        relay.kill()
        assert relay.wait(timeout=10) == -signal.SIGKILL
        interrupted += count_rows(engine, outbox, state="pending") > 0
    assert interrupted, "every kill came after the backlog was drained"

    final = services.relay(RELIABLE_JOB_BATCH_SIZE=str(batch))
    # started first: the killed relays may have drained everything, and a relay stopped before
    # it installs its signal handlers dies of the SIGTERM instead of exiting 0
    wait_for(lambda: started(services, final), message="final relay started")
    wait_for(
        lambda: count_rows(engine, outbox, state="pending") == 0,
        timeout=60,
        message="the final relay to publish the rest",
    )
    assert services.stop(final) == 0
    assert states(engine, outbox) == Counter({"sent": total})

    queued = Counter(queued_ids(redis_url))
    assert set(queued) == set(ids), "a committed job never reached the broker"
    assert sum(queued.values()) - total <= batch * kills

    runs = run_worker_until_done(services, engine, outbox, ids)
    assert set(runs) == set(ids)
    assert sum(runs.values()) - total <= batch * kills


def test_two_relays_never_publish_a_row_twice(services, celery_app, engine, outbox, redis_url, database_url):
    """Two relays draining one table concurrently publish every row exactly once (SKIP LOCKED on
    PostgreSQL, one writer at a time on SQLite)."""
    total, batch = 2000, 50
    relays = [services.relay(RELIABLE_JOB_BATCH_SIZE=str(batch)) for _ in range(2)]
    for relay in relays:
        wait_for(lambda relay=relay: started(services, relay), message="both relays started")
    ids = stage_records(engine, "t", total)  # one commit: both relays see the whole backlog at once

    wait_for(lambda: count_rows(engine, outbox, state="sent") == total, timeout=60, message="every row sent")
    for relay in relays:
        assert services.stop(relay) == 0
    published = [int(services.log(r).rsplit("relay stopped (", 1)[1].split()[0]) for r in relays]
    assert sum(published) == total, published

    queued = queued_ids(redis_url)
    assert len(queued) == total  # LLEN celery
    assert sorted(queued) == sorted(ids)

    runs = run_worker_until_done(services, engine, outbox, ids)
    assert runs == Counter(dict.fromkeys(ids, 1))


def test_sigterm_and_sigint_finish_the_batch_and_exit_0(services, celery_app, engine, outbox, redis_url):
    """SIGTERM and SIGINT make a busy relay finish its batch and exit 0: every row is pending or
    sent, exactly the sent ones are on the broker, and a later relay delivers the rest once."""
    total, batch = 1000, 10
    ids = stage_records(engine, "s", total)
    for sig in (signal.SIGTERM, signal.SIGINT):
        relay = services.relay(RELIABLE_JOB_BATCH_SIZE=str(batch))
        already = count_rows(engine, outbox, state="sent")
        wait_for(
            lambda: count_rows(engine, outbox, state="sent") > already,
            interval=0.01,
            message="the relay to be publishing",
        )
        assert services.stop(relay, sig) == 0, services.log(relay)
        log = services.log(relay)
        assert f"signal {int(sig)}: finishing the batch in flight" in log
        assert "relay stopped" in log
        assert "Traceback" not in log

        counts = states(engine, outbox)
        assert set(counts) <= {"pending", "sent"}
        assert counts["pending"] > 0, "the relay drained the backlog before the signal"
        assert sorted(queued_ids(redis_url)) == sorted(job_ids_in_state(engine, outbox, "sent"))

    final = services.relay(RELIABLE_JOB_BATCH_SIZE=str(batch))
    # started first: the killed relays may have drained everything, and a relay stopped before
    # it installs its signal handlers dies of the SIGTERM instead of exiting 0
    wait_for(lambda: started(services, final), message="final relay started")
    wait_for(
        lambda: count_rows(engine, outbox, state="sent") == total,
        timeout=60,
        message="the final relay to publish the rest",
    )
    assert services.stop(final) == 0
    assert sorted(queued_ids(redis_url)) == sorted(ids)

    runs = run_worker_until_done(services, engine, outbox, ids)
    assert runs == Counter(dict.fromkeys(ids, 1))
