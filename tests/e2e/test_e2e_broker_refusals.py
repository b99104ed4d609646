"""A refused queue key does not stop the others: a real ``reliable-job relay`` process and a real
``celery worker`` (the in-process cases are in ``tests/integration/test_broker_refusals.py``)."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from reliable_job.schema import DEAD
from tests.conftest import wait_for
from tests.integration.test_broker_refusals import app_database, by_job, queued, stage


@pytest.mark.e2e
def test_e2e_wrongtype_queue_does_not_stop_the_others(services, celery_app, engine, outbox, redis_url):
    """A standalone ``reliable-job relay`` and a ``celery worker``: one queue's key holds a string;
    the default queue's jobs all run exactly once, the refused rows go dead (no outage logged), and
    once the key is fixed ``retry-dead`` publishes them exactly once."""
    client = redis_lib.Redis.from_url(redis_url)
    client.set("blocked", "not a list")
    good = stage(engine, "good-", 10)
    blocked = stage(engine, "blocked-", 3, queue="blocked")
    good += stage(engine, "good-", 10)

    worker = services.worker(relay=False)
    relay = services.relay(RELIABLE_JOB_MAX_PUBLISH_ATTEMPTS="2", RELIABLE_JOB_BACKOFF_CAP="0.2")
    wait_for(lambda: set(good) <= {t for t, _, _ in services.executed()}, message="the good jobs to run")
    wait_for(
        lambda: {by_job(engine, outbox)[j]["state"] for j in blocked} == {DEAD},
        message="the refused rows to go dead",
    )
    assert all("WRONGTYPE" in str(by_job(engine, outbox)[j]["last_error"]) for j in blocked)
    assert sorted(t for t, _, _ in services.executed()) == sorted(good)  # each once
    client.delete("blocked")
    assert app_database(celery_app).retry_dead() == len(blocked)
    wait_for(lambda: client.llen("blocked") == len(blocked), message="the retried rows published")
    time.sleep(0.5)
    assert client.llen("blocked") == len(blocked)
    assert queued(redis_url) == dict.fromkeys(blocked, 1)
    services.stop(relay)
    log = services.log(relay)
    assert "relay paused" not in log and "relay pass failed" not in log, log
    services.stop(worker)
    client.close()
