"""End to end: completion follows the message's stamp, not the worker's configuration (issue 9,
failure 8). A job staged by a producer that thinks its task reliable is completed by a worker
that does not (``enable_for_all_jobs`` differs, ``send_task`` by name from another service); a
message that was not staged completes no row, even one with its id."""

from __future__ import annotations

import pytest
from celery import Celery
from sqlalchemy.orm import Session

from reliable_job import bind
from reliable_job.integrations.celery import install
from tests.conftest import count_rows, outbox_rows, sql, wait_for


@pytest.fixture
def all_jobs_app(celery_app, database_url, table_name):
    """The producer: the test app with ``enable_for_all_jobs=True``."""
    runtime = install(celery_app, database_url=database_url, table_name=table_name, enable_for_all_jobs=True)
    yield celery_app
    runtime.database.engine.dispose()


@pytest.fixture
def other_service(database_url, table_name, redis_url):
    """Another service's app: the same outbox and broker, none of the tasks registered."""
    app = Celery("elsewhere", broker=redis_url, set_as_current=False)
    runtime = install(
        app, database_url=database_url, table_name=table_name, enable_for_all_jobs=True, relay_in_worker=False
    )
    yield app
    runtime.database.engine.dispose()


def test_completion_follows_the_stamp_not_the_workers_configuration(
    services, all_jobs_app, other_service, engine, outbox
):
    """Staged by producers with enable_for_all_jobs (a registered task without the option, and
    send_task by name from an app that does not know the task), run by a worker configured with
    it off: each job runs once and its row is deleted, not left 'sent' to be redelivered."""
    from tests.apps.celery_app import plain_record

    worker = services.worker(RELIABLE_JOB_ENABLE_FOR_ALL_JOBS="0")
    with Session(engine) as session, bind(session):
        flagged = plain_record.delay("flagged-by-the-producer")
        by_name = other_service.send_task(plain_record.name, ("sent-by-name",))
        session.commit()
    assert {r["job_id"] for r in outbox_rows(engine, outbox)} == {flagged.id, by_name.id}
    wait_for(
        lambda: {"flagged-by-the-producer", "sent-by-name"} <= set(services.markers()),
        timeout=60,
        message="both jobs to run",
    )
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=30, message="both rows completed")
    assert sorted(services.markers()) == ["flagged-by-the-producer", "sent-by-name"]
    services.stop(worker)


def test_an_unstamped_message_completes_no_row(services, celery_app, engine, outbox):
    """A message published directly (reliable-job off at its producer) of a task the worker thinks
    reliable runs without error and deletes nothing: a staged row with the same id, in another
    state, is untouched."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        record.apply_async(("staged",), task_id="shared-id", reliable_job_session=session)
        session.commit()
    sql(engine, f"UPDATE {outbox.name} SET state = 'dead', last_error = 'kept' WHERE job_id = 'shared-id'")
    worker = services.worker(pool="solo", concurrency=1)

    celery_app.reliable_job._send_task(record.name, ("unstamped",), task_id="shared-id")
    wait_for(lambda: "unstamped" in services.markers(), timeout=60, message="the direct message to run")
    # a job staged and completed after it: the worker's completions up to here are done
    with Session(engine) as session:
        sentinel = record.apply_async(("sentinel",), reliable_job_session=session)
        session.commit()
    wait_for(lambda: "sentinel" in services.markers(), timeout=60, message="the sentinel to run")
    wait_for(
        lambda: sentinel.id not in {r["job_id"] for r in outbox_rows(engine, outbox)},
        message="the sentinel's row completed",
    )
    assert [(r["job_id"], r["state"], r["last_error"]) for r in outbox_rows(engine, outbox)] == [
        ("shared-id", "dead", "kept")
    ]
    assert sorted(services.markers()) == ["sentinel", "unstamped"]
    services.stop(worker)
    assert "Traceback" not in services.log(worker)
