"""End to end: staged in a transaction, relayed by the worker's own relay, run by a real worker."""

from __future__ import annotations

from sqlalchemy.orm import Session

from tests.conftest import count_rows, wait_for


def test_committed_job_runs_once_and_its_row_is_deleted(services, celery_app, engine, outbox):
    from tests.apps.celery_app import record

    worker = services.worker()
    with Session(engine) as session:
        result = record.apply_async(("committed",), reliable_job_session=session)
        session.commit()
    wait_for(lambda: "committed" in services.markers(), message="job to run")
    assert services.executed() == [(result.id, "committed", 0)]
    wait_for(lambda: count_rows(engine, outbox) == 0, message="row deleted on success")
    services.stop(worker)


def test_rolled_back_job_never_runs(services, celery_app, engine, outbox):
    from tests.apps.celery_app import record

    worker = services.worker()
    with Session(engine) as session:
        record.apply_async(("rolled-back",), reliable_job_session=session)
        session.rollback()
    with Session(engine) as session:
        record.apply_async(("after",), reliable_job_session=session)
        session.commit()
    wait_for(lambda: "after" in services.markers(), message="the committed job")
    assert "rolled-back" not in services.markers()
    services.stop(worker)
