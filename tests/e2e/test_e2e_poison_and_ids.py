"""End to end, a real ``reliable-job relay`` process and a real ``celery worker``: rows that cannot be
published fail alone while the rest flow (issue 9, failure 1), and a reused job id is refused at
the call instead of vanishing (failure 5)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from reliable_job import DuplicateJobError
from reliable_job.schema import DEAD
from tests.conftest import count_rows, outbox_rows, stage_records, wait_for


def ran(services) -> list[str]:
    return [task_id for task_id, _, _ in services.executed()]


def test_poison_rows_fail_alone_and_a_reserialized_row_runs(services, celery_app, engine, outbox):
    """Among 60 good rows: one with a mistyped field (a list of mixed types as ``declare``), one
    with an object as priority, one naming an exchange that does not exist, and one whose JSON a
    tool re-serialized. The good rows and the re-serialized one each run once; the three bad rows
    go dead with their error; nothing stalls."""
    ids = stage_records(engine, "p", 64)
    bad = {ids[10]: "mistyped", ids[30]: "priority", ids[40]: "exchange"}
    reserialized = ids[50]
    t = outbox
    with engine.begin() as conn:
        for row in outbox_rows(engine, outbox):
            doc = json.loads(row["message"])
            if row["job_id"] == reserialized:
                text = json.dumps(doc, indent=2, sort_keys=True)
            elif bad.get(row["job_id"]) == "mistyped":
                text = row["message"].replace('"declare":["celery"]', '"declare":["celery",1,{"x":null}]')
                assert text != row["message"]
            elif bad.get(row["job_id"]) == "priority":
                doc["priority"] = {"high": True}
                text = json.dumps(doc)
            elif bad.get(row["job_id"]) == "exchange":
                doc["exchange"] = "no-such-exchange"
                text = json.dumps(doc)
            else:
                continue
            conn.execute(update(t).where(t.c.id == row["id"]).values(message=text))

    services.worker(relay=False)
    relay = services.relay(RELIABLE_JOB_MAX_PUBLISH_ATTEMPTS="2", RELIABLE_JOB_BACKOFF_CAP="0.2")
    good = [i for i in ids if i not in bad]
    wait_for(lambda: set(good) <= set(ran(services)), timeout=180, message="every good job to run")
    wait_for(
        lambda: count_rows(engine, outbox) == len(bad) == count_rows(engine, outbox, state=DEAD),
        timeout=60,
        message="only the bad rows left, dead",
    )
    assert sorted(ran(services)) == sorted(good), "each good job ran once, no bad one ran"
    errors = {r["job_id"]: str(r["last_error"]) for r in outbox_rows(engine, outbox)}
    assert "declare" in errors[ids[10]] and "priority" in errors[ids[30]]
    assert "MessageUnroutable" in errors[ids[40]]
    services.stop(relay)
    assert "relay pass failed" not in services.log(relay) and "relay paused" not in services.log(relay)


@pytest.mark.parametrize("state", ["pending", "dead", "completed"])
def test_a_reused_job_id_is_refused_at_the_call_never_silently_dropped(
    services, celery_app, engine, outbox, state
):
    """A job enqueued with an explicit ``task_id`` while a row with that id is still in the outbox
    (pending, dead) raises ``DuplicateJobError`` at the call, and the caller's transaction still
    commits its other work; once the first job completed (its row deleted) the id is free again
    and the second job runs."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        first = record.apply_async(("first",), reliable_job_session=session, task_id="debounce-42").id
        session.commit()
    if state == "dead":
        with engine.begin() as conn:
            conn.execute(update(outbox).values(state=DEAD, last_error="Boom"))
    if state == "completed":
        services.worker()
        wait_for(lambda: first in ran(services), message="the first job to run")
        wait_for(lambda: count_rows(engine, outbox) == 0, message="its row deleted")

    with Session(engine) as session:
        other = record.apply_async(("other",), reliable_job_session=session).id
        if state == "completed":
            record.apply_async(("second",), reliable_job_session=session, task_id="debounce-42")
        else:
            with pytest.raises(DuplicateJobError, match="debounce-42"):
                record.apply_async(("second",), reliable_job_session=session, task_id="debounce-42")
        session.commit()  # the transaction is still usable: the other job is committed

    if state != "completed":
        services.worker()
    wait_for(lambda: other in ran(services), message="the other job to run")
    runs = [m for t, m, _ in services.executed() if t == "debounce-42"]
    if state == "pending":
        wait_for(lambda: "first" in [m for t, m, _ in services.executed() if t == "debounce-42"])
        assert [m for t, m, _ in services.executed() if t == "debounce-42"] == ["first"]
    elif state == "dead":
        assert runs == []  # the dead row is left for retry-dead, the second job was refused
    else:
        wait_for(lambda: [m for t, m, _ in services.executed() if t == "debounce-42"] == ["first", "second"])
