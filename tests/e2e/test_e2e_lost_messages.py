"""Lost messages: noticed within ``lost_check_after`` (not ``redeliver_after``), never a queued
message republished, and one recovery of a killed worker's job, not two (kombu's restore and the
outbox's redelivery)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import redis as redis_lib
from sqlalchemy.orm import Session

from tests.conftest import count_rows, outbox_rows, stage_records, wait_for
from tests.e2e.test_e2e_worker_crash import pool_children


def _queue_length(redis_url: str, queue: str = "celery") -> int:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def test_messages_lost_by_a_flushed_redis_run_within_lost_check_after(services, celery_app, engine, outbox):
    """FLUSHALL with 100 jobs published and not yet taken: all run, each once, soon after, with
    ``redeliver_after`` at its default."""
    ids = stage_records(engine, "flushed", 100)
    relay = services.relay(RELIABLE_JOB_LOST_CHECK_AFTER="3")
    wait_for(lambda: _queue_length(services.broker_url) == 100, timeout=60, message="100 jobs published")
    client = redis_lib.Redis.from_url(services.broker_url)
    client.flushall()
    client.close()
    worker = services.worker(relay=False)
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=90, message="every lost job ran")
    time.sleep(5)  # any duplicate would be in flight by now
    runs = Counter(task_id for task_id, _, _ in services.executed())
    assert set(runs) == set(ids)
    assert set(runs.values()) == {1}
    assert "publishing them again" in services.log(relay)
    services.stop(worker)
    services.stop(relay)


def test_a_long_queue_is_never_republished(services, celery_app, engine, outbox):
    """2,000 jobs waiting longer than ``lost_check_after`` (no worker yet): none is published
    again, and each runs once when a worker comes."""
    ids = stage_records(engine, "queued", 2000)
    relay = services.relay(RELIABLE_JOB_LOST_CHECK_AFTER="1")
    wait_for(lambda: _queue_length(services.broker_url) == 2000, timeout=120, message="2,000 jobs published")
    time.sleep(10)  # several loss checks over rows sent more than lost_check_after ago
    assert _queue_length(services.broker_url) == 2000
    assert {row["attempts"] for row in outbox_rows(engine, outbox)} == {1}
    worker = services.worker(relay=False, concurrency=4)
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=180, message="every queued job ran")
    runs = Counter(task_id for task_id, _, _ in services.executed())
    assert set(runs) == set(ids)
    assert set(runs.values()) == {1}
    assert "publishing them again" not in services.log(relay)
    services.stop(worker)
    services.stop(relay)


def test_a_killed_acks_late_job_is_recovered_once(services, celery_app, engine, outbox):
    """An ``acks_late`` worker SIGKILLed in the middle of a job, ``redeliver_after`` small and
    kombu's ``visibility_timeout`` small too: the job runs twice at most (the killed run and one
    recovery), never three times."""
    from tests.apps.celery_app import crash_once

    with Session(engine) as session:
        job_id = crash_once.apply_async(("crashed",), reliable_job_session=session).id
        session.commit()
    env = {"RELIABLE_JOB_REDELIVER_AFTER": "3", "RJ_TEST_VISIBILITY_TIMEOUT": "5"}
    worker = services.worker(**env)
    wait_for(lambda: "crashed:start" in services.markers(), timeout=60, message="the job started")
    for pid in [*pool_children(worker.pid), worker.pid]:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    replacement = services.worker(**env)
    wait_for(lambda: "crashed" in services.markers(), timeout=120, message="the job recovered")
    time.sleep(20)  # kombu's restore (visibility 5 s, swept every second) and the backstop both had time
    runs = Counter(marker for task_id, marker, _ in services.executed() if task_id == job_id)
    assert runs["crashed:start"] == 2, runs
    assert runs["crashed"] == 1, runs
    assert count_rows(engine, outbox) == 0
    services.stop(replacement)


def test_a_long_running_early_ack_job_is_not_republished(services, celery_app, engine, outbox):
    """Celery's default early acknowledgement: the message leaves Redis as the job starts. A job
    running far longer than ``lost_check_after`` is not taken for lost."""
    from tests.apps.celery_app import slow_record

    with Session(engine) as session:
        job_id = slow_record.apply_async(("long",), {"seconds": 15}, reliable_job_session=session).id
        session.commit()
    worker = services.worker(RELIABLE_JOB_LOST_CHECK_AFTER="1", RELIABLE_JOB_BACKOFF_CAP="1.0")
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=90, message="the long job completed")
    time.sleep(3)
    assert [task_id for task_id, _, _ in services.executed()] == [job_id]
    assert "publishing them again" not in services.log(worker)
    services.stop(worker)
