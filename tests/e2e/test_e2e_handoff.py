"""Continuations hand off atomically (issue 9, failures 4 and 7), and Ignore/Reject are decided.

Real ``celery worker`` processes (with their relay) on SQLite and PostgreSQL: a staged job's
chain step, callbacks and replacement are written to the outbox, and the job's row finished, in
one transaction on the outbox database, never in the user's session; when that transaction fails
the row stays and the job is delivered again. ``redeliver_after`` is short (3 s) and each test
waits past it, so a row left behind shows up as a second run.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sqlalchemy import select, text

from tests.conftest import count_rows, wait_for

REDELIVER_AFTER = 3.0
QUIET = {"RELIABLE_JOB_REDELIVER_AFTER": str(REDELIVER_AFTER)}


def settle(services, engine, outbox, expected: Counter, timeout: float = 40) -> None:
    """Wait until the markers are ``expected`` and the outbox is empty, then past
    ``redeliver_after`` (and a redelivery pass) to prove nothing runs again."""
    wait_for(
        lambda: Counter(services.markers()) == expected and count_rows(engine, outbox) == 0,
        timeout=timeout,
        message=f"markers {dict(expected)} and an empty outbox",
    )
    time.sleep(REDELIVER_AFTER + 2.5)
    assert Counter(services.markers()) == expected
    assert count_rows(engine, outbox) == 0


def test_replace_with_a_chain_runs_every_step_once(services, celery_app, engine, outbox):
    """``self.replace(b.s() | c.s())``: b and c both run once (c carries the replaced task's id),
    the outbox ends empty, nothing is redelivered."""
    from tests.apps.celery_app import replace_with_chain

    services.worker(**QUIET)
    services.worker(**QUIET)
    replace_with_chain.delay("r")
    settle(services, engine, outbox, Counter({"r": 1, "r:b": 1, "r:c": 1}))


def test_replace_with_one_task_hands_the_row_over(services, celery_app, engine, outbox):
    """``self.replace(b.s())``: b takes the replaced task's id and its row; runs once."""
    from tests.apps.celery_app import replace_with_one

    services.worker(**QUIET)
    result = replace_with_one.delay("one")
    settle(services, engine, outbox, Counter({"one": 1, "one:b": 1}))
    assert sorted(services.executed())[0][0] == result.id  # both ran under the same id
    assert {task_id for task_id, _, _ in services.executed()} == {result.id}


def test_chain_step_survives_a_session_provider_that_raises(services, celery_app, engine, outbox):
    """The worker's session provider raises (Flask-SQLAlchemy outside an app context): the
    chain's next step is handed off on the outbox database, and the parent is not failed."""
    from tests.apps.celery_app import record

    worker = services.worker(RJ_TEST_SESSION_PROVIDER="raises", **QUIET)
    (record.si("p:a") | record.si("p:b")).delay()
    settle(services, engine, outbox, Counter({"p:a": 1, "p:b": 1}))
    log = services.log(worker)
    assert "application context" not in log
    assert "raised unexpected" not in log


def test_chain_step_survives_a_session_rolled_back_after_the_task(services, celery_app, engine, outbox):
    """The task body leaves the provider's session in a transaction that is rolled back after
    the task (an app-context teardown): the chain's next step still runs."""
    from tests.apps.celery_app import leave_session_open, record

    services.worker(RJ_TEST_SESSION_PROVIDER="leaky", **QUIET)
    (leave_session_open.si("l:a") | record.si("l:b")).delay()
    settle(services, engine, outbox, Counter({"l:a": 1, "l:b": 1}))


def test_link_callback_and_errback_are_handed_off(services, celery_app, engine, outbox):
    """``link`` on success, ``link_error`` on a final failure: each runs once, rows gone."""
    from tests.apps.celery_app import always_fail, record

    services.worker(**QUIET)
    record.apply_async(("k:a",), link=record.si("k:link"))
    always_fail.apply_async(("k:f",), link_error=record.si("k:errback"))
    settle(services, engine, outbox, Counter({"k:a": 1, "k:link": 1, "k:f:attempt": 1, "k:errback": 1}))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_failed_hand_off_keeps_the_row_and_redelivers(services, celery_app, engine, outbox):
    """The hand-off's INSERT fails once (a trigger): the job's row stays ``sent``, the job is
    delivered again after ``redeliver_after`` and hands off then; nothing is lost."""
    from tests.apps.celery_app import record

    table = outbox.name
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SEQUENCE {table}_fail"))
        conn.execute(
            text(
                f"CREATE FUNCTION {table}_fail() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.job_id LIKE 'handoff-fail-%' AND nextval('{table}_fail') = 1 THEN "
                "RAISE EXCEPTION 'injected hand-off failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER {table}_fail BEFORE INSERT ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_fail()"
            )
        )
    worker = services.worker(**QUIET)
    (record.si("f:a") | record.si("f:b").set(task_id="handoff-fail-b")).delay()
    settle(services, engine, outbox, Counter({"f:a": 2, "f:b": 1}))
    assert "could not hand job" in services.log(worker)


def test_ignore_deletes_the_row(services, celery_app, engine, outbox):
    """``raise Ignore()``: the task is done; its row is deleted, it never runs again."""
    from tests.apps.celery_app import ignore_after_record

    services.worker(**QUIET)
    ignore_after_record.delay("i")
    settle(services, engine, outbox, Counter({"i": 1}))


def test_reject_without_requeue_is_a_final_failure(services, celery_app, engine, outbox):
    """``Reject(requeue=False)``: dead with its reason (``preserve_dead_jobs``), never rerun."""
    from tests.apps.celery_app import reject_after_record

    services.worker(RELIABLE_JOB_PRESERVE_DEAD_JOBS="1", **QUIET)
    result = reject_after_record.delay("x")
    wait_for(lambda: count_rows(engine, outbox, state="dead") == 1, timeout=30, message="a dead row")
    time.sleep(REDELIVER_AFTER + 2.5)
    assert services.markers() == ["x"]
    with engine.connect() as conn:
        row = conn.execute(select(outbox.c.job_id, outbox.c.last_error)).one()
    assert row.job_id == result.id
    assert "rejected x" in row.last_error


def test_reject_with_requeue_keeps_the_row(services, celery_app, engine, outbox):
    """``Reject(requeue=True)``: the message goes back to the broker; the row stays ``sent``
    (the job is not finished: it runs again)."""
    from tests.apps.celery_app import reject_after_record

    worker = services.worker()  # redeliver_after as default: the row must stay as it is
    reject_after_record.delay("q", requeue=True)
    worker.wait_for_line(r"rejected q", timeout=30)
    time.sleep(1.0)  # past completion_interval: a delete would have happened
    assert count_rows(engine, outbox, state="sent") == 1
