"""Retries meet the loss check and redelivery: a retry waiting in its queue is never taken for a
lost message, and a stamped job's retry moves its row's due time whatever the worker thinks of the
task (real SQLite/PostgreSQL and Redis)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import redis as redis_lib
from kombu.utils.json import loads

from reliable_job.ports import SentRow
from reliable_job.recovery import Recovery
from tests.conftest import outbox_rows, stage_records


def _rows(engine, outbox):
    return [SentRow(r["id"], r["job_id"], r["message"], r["attempts"]) for r in outbox_rows(engine, outbox)]


@contextmanager
def running(task, job_id: str):
    """``task`` running job ``job_id`` from a stamped message, as the worker's tracer sets it up."""
    from celery._state import _task_stack

    task.push_request(id=job_id, called_directly=False, reliable_job=1, headers={"reliable_job": 1})
    _task_stack.push(task)
    try:
        yield
    finally:
        _task_stack.pop()
        task.pop_request()


def _publish_and_take(celery_app, engine, client):
    (job_id,) = stage_records(engine, "retry", 1)
    relay = celery_app.reliable_job.relay()
    assert relay.run_once() == 1
    assert loads(client.rpop("celery"))["headers"]["id"] == job_id  # the worker took it (early ack)
    return job_id, relay


def _checks(celery_app, relay, count: int = 3) -> int:
    now = [1000.0]
    recovery = Recovery(
        celery_app.reliable_job.database,
        relay.broker,
        lost_check_after=1.0,
        redeliver_after=3600.0,
        max_deliveries=10,
        clock=lambda: now[0],
    )
    requeued = 0
    for _ in range(count):
        now[0] += 60
        requeued += recovery.check_lost()
    return requeued


def test_a_retry_waiting_in_the_queue_is_not_taken_for_lost(celery_app, engine, outbox, redis_url):
    """A job runs (early ack: its message left Redis) and calls ``retry(countdown=600)``: Celery
    republishes it under its own id through kombu (kombu's delivery tag, not the relay's) and the
    task ends in RETRY (postrun). The retry's message waits: the loss check must not publish the
    job once more (before the fix: requeued once, two messages of the job queued)."""
    from reliable_job.integrations.celery import markers, worker
    from reliable_job.integrations.celery.lost import STARTED_PREFIX
    from tests.apps.celery_app import record

    celery_app.reliable_job.settings = celery_app.reliable_job.settings.replace(lost_check_after=1.0)
    client = redis_lib.Redis.from_url(redis_url)
    job_id, relay = _publish_and_take(celery_app, engine, client)
    with running(record, job_id):
        worker._mark_started(sender=record, task_id=job_id)
        record.apply_async(("retry0",), task_id=job_id, countdown=600)  # what Task.retry does
        worker._mark_finished(sender=record, task_id=job_id, state="RETRY")
    markers.flush()  # written by this process's marker writer, a few ms later
    assert client.llen("celery") == 1
    assert client.ttl(STARTED_PREFIX + job_id) > 600  # until the retry is due, and then some
    time.sleep(1.2)
    requeued = _checks(celery_app, relay)
    relay.run_once()
    ids = [loads(m)["headers"]["id"] for m in client.lrange("celery", 0, -1)]
    relay.broker.close()
    client.close()
    assert requeued == 0 and ids == [job_id], f"requeued {requeued}; queued messages of the job: {len(ids)}"


def test_a_stamped_jobs_retry_postpones_its_row_whatever_the_worker_thinks(
    celery_app, engine, outbox, redis_url
):
    """Completion follows the stamp; so must the retry's bookkeeping: a stamped job whose task
    this worker does not take for reliable (here: sent by a name this worker does not know) still
    moves its row's due time when it retries."""
    from tests.apps.celery_app import record

    client = redis_lib.Redis.from_url(redis_url)
    job_id, relay = _publish_and_take(celery_app, engine, client)
    with running(record, job_id):
        celery_app.send_task("tests.not_registered_here", ("x",), task_id=job_id, countdown=600)
    (row,) = outbox_rows(engine, outbox)
    relay.broker.close()
    client.close()
    assert row["eta"] is not None, "the retry did not move its row's due time"
