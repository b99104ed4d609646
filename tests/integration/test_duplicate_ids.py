"""Reused ids never vanish (issue 9, failure 5): an explicit ``task_id`` already in the outbox
(pending, sent, dead) raises DuplicateJobError at the call; the caller's transaction stays usable
and commits its other work (PostgreSQL would abort a transaction after an error: the INSERT's
``ON CONFLICT DO NOTHING`` avoids one). Without a conflict, staging stays one statement."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, select, update
from sqlalchemy.orm import Session

from reliable_job.errors import DuplicateJobError, StagingError

STATES = ["pending", "sent", "dead"]


@pytest.fixture
def work(engine, table_name):
    """A table of the application's own."""
    table = Table(
        f"work_{table_name}", MetaData(), Column("id", Integer, primary_key=True), Column("note", String(50))
    )
    table.metadata.create_all(engine)
    yield table
    table.metadata.drop_all(engine)


def stage_first(engine, outbox, state):
    from tests.apps.celery_app import record

    record.apply_async(("first",), task_id="debounced")  # a transaction of its own
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.job_id == "debounced").values(state=state))


@pytest.mark.parametrize("state", STATES)
def test_a_reused_id_in_the_callers_session_raises_and_the_session_commits(
    celery_app, engine, outbox, work, state
):
    """In the caller's session (the psycopg fast path on PostgreSQL)."""
    from tests.apps.celery_app import record

    stage_first(engine, outbox, state)
    with Session(engine) as session:
        session.execute(insert(work).values(note="before"))
        with pytest.raises(DuplicateJobError) as raised:
            record.apply_async(("second",), task_id="debounced", reliable_job_session=session)
        other = record.apply_async(("other",), reliable_job_session=session)  # still usable
        session.execute(insert(work).values(note="after"))
        session.commit()
    assert isinstance(raised.value, StagingError) and raised.value.job_ids == ["debounced"]
    with engine.connect() as conn:
        assert sorted(conn.execute(select(work.c.note)).scalars()) == ["after", "before"]
        rows = sorted(tuple(r) for r in conn.execute(select(outbox.c.job_id, outbox.c.state)))
    assert rows == sorted([("debounced", state), (other.id, "pending")])


@pytest.mark.parametrize("state", STATES)
def test_a_reused_id_in_a_transaction_of_its_own_raises(celery_app, engine, outbox, state):
    from tests.apps.celery_app import record

    stage_first(engine, outbox, state)
    with pytest.raises(DuplicateJobError):
        record.apply_async(("second",), task_id="debounced")
    with engine.connect() as conn:
        assert conn.execute(select(outbox.c.state)).scalars().all() == [state]


def test_a_connection_target_keeps_its_transaction(celery_app, engine, outbox, work):
    """A Connection (no Session): same outcome."""
    from tests.apps.celery_app import record

    stage_first(engine, outbox, "sent")
    with engine.connect() as conn:
        conn.execute(insert(work).values(note="kept"))
        with pytest.raises(DuplicateJobError):
            record.apply_async(("second",), task_id="debounced", reliable_job_session=conn)
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute(select(work.c.note)).scalars().all() == ["kept"]


def test_a_batch_names_the_conflicting_ids(celery_app, engine, outbox):
    """Several jobs in one call (executemany): the ids already there are named, the rest staged."""
    from reliable_job.ports import StagedJob

    stage_first(engine, outbox, "pending")
    jobs = [StagedJob(i, "t", "celery", "{}") for i in ("a", "debounced", "b")]
    with Session(engine) as session:
        with pytest.raises(DuplicateJobError) as raised:
            celery_app.reliable_job.database.stager.stage(jobs, session)
        session.commit()
    assert raised.value.job_ids == ["debounced"]
    with engine.connect() as conn:
        assert sorted(conn.execute(select(outbox.c.job_id)).scalars()) == ["a", "b", "debounced"]


def test_staging_without_a_conflict_is_one_statement(celery_app, engine, outbox):
    """No extra round trip to detect conflicts: one INSERT (``RETURNING job_id`` tells) through
    SQLAlchemy. (On PostgreSQL with psycopg the caller's session takes the fast path, one
    ``cursor.execute`` whose row count tells; the transaction of its own is counted here.)"""
    from tests.apps.celery_app import record

    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    engines = [engine, celery_app.reliable_job.database.engine]  # the caller's, the outbox's own
    for each in engines:
        event.listen(each, "before_cursor_execute", count)
    try:
        if engine.dialect.name == "sqlite":
            with Session(engine) as session:
                record.apply_async(("one",), reliable_job_session=session)
                session.commit()
        record.apply_async(("two",))  # a transaction of its own
        with engine.connect() as conn:
            record.apply_async(("three",), reliable_job_session=conn)
            conn.commit()
    finally:
        for each in engines:
            event.remove(each, "before_cursor_execute", count)
    staging = [s for s in statements if "INSERT" in s.upper()]
    expected = 3 if engine.dialect.name == "sqlite" else 1  # psycopg: the fast path, no events
    assert len(staging) == expected
    assert [s for s in statements if s.lstrip().upper().startswith("SELECT")] == []
