"""End to end: what happens to a job's row once a real worker runs it (success, Celery retries,
final failures, preserved dead jobs), and that staged jobs keep Celery's own semantics (the task
id, countdown/eta, jobs enqueued from inside a task)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import count_rows, outbox_rows, stage_records, wait_for


def row_of(engine, outbox, job_id: str) -> dict[str, object] | None:
    return next((r for r in outbox_rows(engine, outbox) if r["job_id"] == job_id), None)


def executions_at(services) -> list[tuple[str, str, int, float]]:
    """Like ``services.executed()``, with the time each execution was recorded (``at``)."""
    ex = services.executions
    with services.engine.connect() as conn:
        rows = conn.execute(select(ex.c.task_id, ex.c.marker, ex.c.attempt, ex.c.at).order_by(ex.c.id)).all()
    return [(task_id, marker, attempt, float(at)) for task_id, marker, attempt, at in rows]


def stage(engine, task, *args, kwargs=None, **options):
    """Enqueue ``task(*args, **kwargs)`` in a transaction of the test's own and commit it."""
    with Session(engine) as session:
        result = task.apply_async(args, kwargs, reliable_job_session=session, **options)
        session.commit()
    return result


def test_success_and_celery_retries_settle_the_row(services, celery_app, engine, outbox):
    """Success deletes the row; a Celery retry keeps it 'sent', is not staged again, runs under the
    same task id and its success deletes it; a final failure (immediate or after exhausted
    retries) deletes it by default."""
    from tests.apps.celery_app import always_fail, fail_then_succeed, record

    worker = services.worker()

    ok = stage(engine, record, "ok")
    assert row_of(engine, outbox, ok.id) is not None
    wait_for(lambda: "ok" in services.markers(), message="the job to run")
    wait_for(lambda: row_of(engine, outbox, ok.id) is None, message="row deleted on success")

    retried = stage(engine, fail_then_succeed, "retried", kwargs={"failures": 1, "countdown": 3})
    wait_for(
        lambda: ("retried:attempt", 0) in [(m, a) for _, m, a in services.executed()],
        message="the first attempt",
    )
    # The retry waits 3 s in the worker: meanwhile the row is still there, sent, and alone.
    rows = outbox_rows(engine, outbox)
    assert [(r["job_id"], r["state"]) for r in rows] == [(retried.id, "sent")]
    assert "retried" not in services.markers()
    wait_for(lambda: "retried" in services.markers(), timeout=30, message="the retry to succeed")
    wait_for(lambda: count_rows(engine, outbox) == 0, message="row deleted after the retry")
    runs = [(t, m, a) for t, m, a, _ in executions_at(services) if m.startswith("retried")]
    assert runs == [
        (retried.id, "retried:attempt", 0),
        (retried.id, "retried:attempt", 1),
        (retried.id, "retried", 1),
    ]

    failed = stage(engine, always_fail, "failed")
    exhausted = stage(engine, always_fail, "exhausted", kwargs={"retry": True})
    wait_for(
        lambda: sum(m == "exhausted:attempt" for m in services.markers()) == 2,
        message="both attempts of the retried failure",
    )
    wait_for(lambda: count_rows(engine, outbox) == 0, message="rows of failed jobs deleted")
    runs = [(t, m, a) for t, m, a in services.executed() if m.split(":")[0] in ("failed", "exhausted")]
    assert sorted(runs) == sorted(
        [
            (failed.id, "failed:attempt", 0),
            (exhausted.id, "exhausted:attempt", 0),
            (exhausted.id, "exhausted:attempt", 1),
        ]
    )
    services.stop(worker)


def test_preserve_dead_jobs_keeps_failed_rows_dead(services, celery_app, engine, outbox):
    """With RELIABLE_JOB_PRESERVE_DEAD_JOBS=1 a final failure (immediate or after exhausted
    retries) leaves the row 'dead' with the exception in last_error; success still deletes it."""
    from tests.apps.celery_app import always_fail, record

    worker = services.worker(RELIABLE_JOB_PRESERVE_DEAD_JOBS="1")
    failed = stage(engine, always_fail, "failed")
    exhausted = stage(engine, always_fail, "exhausted", kwargs={"retry": True})
    ok = stage(engine, record, "ok")

    def dead(job_id: str) -> bool:
        row = row_of(engine, outbox, job_id)
        return row is not None and row["state"] == "dead"

    wait_for(lambda: dead(failed.id) and dead(exhausted.id), message="failed rows dead")
    assert "ValueError: boom failed" in str(row_of(engine, outbox, failed.id)["last_error"])
    assert "ValueError: boom exhausted" in str(row_of(engine, outbox, exhausted.id)["last_error"])
    assert [a for t, _, a, _ in executions_at(services) if t == exhausted.id] == [0, 1]
    wait_for(lambda: row_of(engine, outbox, ok.id) is None, message="row of the success deleted")
    assert {r["job_id"] for r in outbox_rows(engine, outbox)} == {failed.id, exhausted.id}
    services.stop(worker)


def test_task_id_countdown_and_eta_survive_staging(services, celery_app, engine, outbox):
    """The AsyncResult id is the id of the task that runs; countdown and eta tasks never run before
    their time."""
    from tests.apps.celery_app import record

    worker = services.worker()
    now = stage(engine, record, "now")
    before_countdown = time.time()
    later = stage(engine, record, "countdown", countdown=2)
    eta = datetime.now(timezone.utc) + timedelta(seconds=2)
    scheduled = stage(engine, record, "eta", eta=eta)
    assert {r["job_id"] for r in outbox_rows(engine, outbox)} == {now.id, later.id, scheduled.id}

    wait_for(
        lambda: {"now", "countdown", "eta"} <= set(services.markers()),
        timeout=30,
        message="the three jobs to run",
    )
    runs = {marker: (task_id, at) for task_id, marker, _, at in executions_at(services)}
    assert runs["now"][0] == now.id
    assert runs["countdown"][0] == later.id
    assert runs["eta"][0] == scheduled.id
    assert runs["countdown"][1] >= before_countdown + 2
    assert runs["eta"][1] >= eta.timestamp()
    assert len(services.executed()) == 3
    wait_for(lambda: count_rows(engine, outbox) == 0, message="rows deleted")
    services.stop(worker)


def test_job_enqueued_inside_a_task_is_staged(services, celery_app, engine, outbox):
    """A job enqueued from inside a running task gets its own outbox row and only runs once a relay
    publishes that row."""
    from tests.apps.celery_app import spawn

    worker = services.worker(relay=False)  # this process relays, one pass at a time
    relay = celery_app.reliable_job.relay()
    try:
        parent = stage(engine, spawn, "parent")
        assert relay.run_once() == 1
        wait_for(lambda: "parent" in services.markers(), message="the parent to run")
        wait_for(lambda: row_of(engine, outbox, parent.id) is None, message="parent row deleted")
        rows = outbox_rows(engine, outbox)
        assert [(r["task_name"], r["state"]) for r in rows] == [("tests.apps.celery_app.record", "pending")]
        child_id = rows[0]["job_id"]
        assert child_id != parent.id
        assert "parent:child" not in services.markers()  # nothing relayed it yet

        assert relay.run_once() == 1
        wait_for(lambda: "parent:child" in services.markers(), message="the child to run")
        assert sorted(services.executed()) == sorted(
            [(parent.id, "parent", 0), (child_id, "parent:child", 0)]
        )
        wait_for(lambda: count_rows(engine, outbox) == 0, message="child row deleted")
    finally:
        relay.broker.close()
    services.stop(worker)


def test_a_revoked_job_is_buried_when_dead_jobs_are_preserved(services, celery_app, engine, outbox):
    """A job revoked before it runs is a final failure: its row is kept dead with 'revoked'."""
    from tests.apps.celery_app import record

    worker = services.worker(RELIABLE_JOB_PRESERVE_DEAD_JOBS="1")
    doomed = stage(engine, record, "revoked", countdown=4)
    wait_for(
        lambda: (row_of(engine, outbox, doomed.id) or {}).get("state") == "sent",
        message="the job to be published",
    )
    celery_app.control.revoke(doomed.id)
    wait_for(
        lambda: (row_of(engine, outbox, doomed.id) or {}).get("state") == "dead",
        timeout=30,
        message="the revoked job's row to be buried",
    )
    assert row_of(engine, outbox, doomed.id)["last_error"] == "revoked"
    assert "revoked" not in services.markers()
    services.stop(worker)


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_warm_shutdown_deletes_the_rows_still_buffered(services, celery_app, engine, outbox, pool):
    """Batched completion: with a completion interval far longer than the test, the rows of
    finished jobs wait in the worker processes' buffers (still 'sent'); a warm shutdown (SIGTERM)
    deletes them before the worker exits (prefork children on worker_process_shutdown, the main
    process on worker_shutdown)."""
    worker = services.worker(pool=pool, RELIABLE_JOB_COMPLETION_INTERVAL="3600")
    ids = stage_records(engine, "buffered", 12)
    wait_for(lambda: len(services.markers()) == 12, message="every job to run")
    # Ran, yet their rows remain: the deletes wait in the buffers.
    assert {r["job_id"] for r in outbox_rows(engine, outbox)} == set(ids)
    assert services.stop(worker) == 0, services.log(worker)
    assert outbox_rows(engine, outbox) == [], services.log(worker)
