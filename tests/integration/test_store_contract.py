"""One contract for every outbox store: the in-memory fake, SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update

from reliable_job import Settings
from reliable_job.errors import DuplicateJobError
from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase
from reliable_job.ports import StagedJob
from reliable_job.testing import InMemoryStore
from tests.conftest import need


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request, tmp_path, table_name):
    if request.param == "memory":
        yield InMemoryStore()
        return
    url = (
        f"sqlite:///{tmp_path / 'store.sqlite3'}"
        if request.param == "sqlite"
        else need("RELIABLE_JOB_TEST_POSTGRES_URL")
    )
    db = SQLAlchemyDatabase(Settings(database_url=url, table_name=table_name))
    db.create_table()
    yield db
    db.table.drop(db.engine)
    db.engine.dispose()


def stage(store, jobs):
    if isinstance(store, InMemoryStore):
        store.write(jobs)
    else:
        store.stager.stage(jobs)


def age_sent(store, seconds):
    """Pretend every sent row was published ``seconds`` earlier."""
    if isinstance(store, InMemoryStore):
        for row in store.rows.values():
            row.sent_at -= seconds
        return
    t = store.table
    with store.engine.begin() as conn:
        for row_id, sent_at in conn.execute(t.select().with_only_columns(t.c.id, t.c.sent_at)):
            if sent_at is not None:
                conn.execute(
                    update(t).where(t.c.id == row_id).values(sent_at=sent_at - timedelta(seconds=seconds))
                )


def job(i, eta=None):
    return StagedJob(f"job-{i}", "task", "celery", f'{{"n": {i}}}', eta)


def test_claim_returns_pending_rows_in_order_and_mark_sent(store):
    """Claims return pending rows oldest first; sent rows are not claimed again."""
    stage(store, [job(i) for i in range(5)])
    with store.claim(3) as claim:
        assert [r.job_id for r in claim.rows] == ["job-0", "job-1", "job-2"]
        assert claim.rows[0].message == '{"n": 0}'
        claim.mark_sent([r.id for r in claim.rows])
    with store.claim(10) as claim:
        assert [r.job_id for r in claim.rows] == ["job-3", "job-4"]
    assert store.status().as_dict()["sent"] == 3


def test_a_failed_claim_changes_nothing(store):
    """An exception inside a claim (a crash mid-batch) rolls back: rows stay pending."""
    stage(store, [job(i) for i in range(2)])
    with pytest.raises(RuntimeError), store.claim(10) as claim:
        claim.mark_sent([r.id for r in claim.rows])
        raise RuntimeError("crash before commit")
    assert store.status().pending == 2


def test_mark_failed_backs_off_then_buries(store):
    """A failed row waits out its backoff (not claimable), then can be set dead."""
    stage(store, [job(0), job(1)])
    with store.claim(10) as claim:
        claim.mark_failed(claim.rows[0], "boom", retry_in=3600)
        claim.mark_failed(claim.rows[1], "fatal", retry_in=None)
    with store.claim(10) as claim:
        assert claim.rows == [] or list(claim.rows) == []
    status = store.status()
    assert (status.pending, status.dead) == (1, 1)
    assert store.retry_dead() == 1
    with store.claim(10) as claim:
        assert [r.job_id for r in claim.rows] == ["job-1"]


def make_due(store):
    """Pretend every row's backoff is over."""
    if isinstance(store, InMemoryStore):
        for row in store.rows.values():
            row.available_at = 0.0
        return
    with store.engine.begin() as conn:
        conn.execute(update(store.table).values(available_at=None))


def last_error(store, job_id):
    if isinstance(store, InMemoryStore):
        (row,) = [r for r in store.rows.values() if r.job.job_id == job_id]
        return row.last_error
    t = store.table
    with store.engine.connect() as conn:
        return conn.execute(t.select().with_only_columns(t.c.last_error).where(t.c.job_id == job_id)).scalar()


def test_defer_leaves_a_row_for_later_without_counting_an_attempt(store):
    """A deferred row (one the relay cannot read yet) is pending again once its delay is over,
    with the attempts and last error it had before the claim: never buried, never counted."""
    stage(store, [job(0), job(1)])
    with store.claim(10) as claim:
        claim.mark_failed(claim.rows[0], "boom", retry_in=0)
        claim.mark_sent([claim.rows[1].id])
    with store.claim(10) as claim:
        (row,) = claim.rows
        assert (row.job_id, row.attempts) == ("job-0", 1)
        claim.defer(row, 3600)
    with store.claim(10) as claim:
        assert list(claim.rows) == [], "not before its delay"
    assert store.status().as_dict() | {"oldest_pending_seconds": None} == {
        "pending": 1,
        "sent": 1,
        "dead": 0,
        "oldest_pending_seconds": None,
    }
    make_due(store)
    with store.claim(10) as claim:
        assert [(r.job_id, r.attempts) for r in claim.rows] == [("job-0", 1)]
        claim.defer(claim.rows[0], 0)
    with store.claim(10) as claim:
        assert [(r.job_id, r.attempts) for r in claim.rows] == [("job-0", 1)], "attempts unchanged"
    assert last_error(store, "job-0") == "boom"


def test_complete_and_bury(store):
    """Completion deletes a job's row; burying keeps it dead; unknown ids are no-ops."""
    stage(store, [job(0), job(1)])
    assert store.complete_many(["job-0"]) == 1
    assert store.complete_many(["job-0"]) == 0
    assert store.bury("job-1", "ValueError: x") == 1
    assert store.status().as_dict() == {"pending": 0, "sent": 0, "dead": 1, "oldest_pending_seconds": None}


def test_complete_many_deletes_every_listed_row_in_one_call(store):
    """Batched completion: the listed rows go (whatever their state), others stay; unknown ids
    and an empty list are no-ops."""
    stage(store, [job(i) for i in range(5)])
    assert store.complete_many([]) == 0
    assert store.complete_many(["job-0", "job-2", "job-4", "job-unknown"]) == 3
    assert store.complete_many(["job-0"]) == 0
    left = store.status().as_dict()
    assert left["pending"] == 2
    with store.claim(10) as claim:
        assert sorted(r.job_id for r in claim.rows) == ["job-1", "job-3"]
        claim.mark_sent([r.id for r in claim.rows])
    assert store.complete_many(["job-1", "job-3"]) == 2
    assert store.status().as_dict() == {"pending": 0, "sent": 0, "dead": 0, "oldest_pending_seconds": None}


def test_staging_the_same_job_id_twice_keeps_one_row(store):
    """The job id is unique: a second staging of it writes nothing and raises DuplicateJobError
    (issue 9: never silent)."""
    stage(store, [job(0)])
    with pytest.raises(DuplicateJobError) as raised:
        stage(store, [job(0)])
    assert raised.value.job_ids == ["job-0"]
    assert store.status().pending == 1


@pytest.mark.parametrize("state", ["pending", "sent", "dead"])
def test_a_batch_names_the_ids_already_in_the_outbox(store, state):
    """Several jobs at once: the ids already there (in any state, or twice in the batch) are
    named; the others are staged."""
    stage(store, [job(1)])
    if state != "pending":
        with store.claim(10) as claim:
            if state == "sent":
                claim.mark_sent([r.id for r in claim.rows])
            else:
                claim.mark_failed(claim.rows[0], "boom", retry_in=None)
    with pytest.raises(DuplicateJobError) as raised:
        stage(store, [job(0), job(1), job(2), job(2)])
    assert raised.value.job_ids == ["job-1", "job-2"]
    status = store.status()
    assert status.pending + status.sent + status.dead == 3


def job_ids(store):
    if isinstance(store, InMemoryStore):
        return sorted((r.job.job_id, r.state, r.job.message) for r in store.rows.values())
    t = store.table
    with store.engine.connect() as conn:
        return sorted(
            tuple(r) for r in conn.execute(t.select().with_only_columns(t.c.job_id, t.c.state, t.c.message))
        )


def test_hand_off_replaces_the_row_with_its_continuations(store):
    """A finished job hands off: its row goes, its continuations are in, the one carrying its own
    id (Task.replace) included; an id already in the outbox (a rerun's) is kept as it was."""
    stage(store, [job(0), job(9)])
    with store.claim(10) as claim:
        claim.mark_sent([r.id for r in claim.rows])
    replacement = StagedJob("job-0", "task", "celery", '{"replaced": true}')
    store.hand_off(
        "job-0", [replacement, job(1), StagedJob("job-9", "task", "celery", "{}")], task_name="task"
    )
    assert job_ids(store) == [
        ("job-0", "pending", '{"replaced": true}'),
        ("job-1", "pending", '{"n": 1}'),
        ("job-9", "sent", '{"n": 9}'),
    ]


def test_hand_off_of_a_failure_buries_the_row(store):
    """With an error the row is set dead (preserve_dead_jobs) and the errbacks are in."""
    stage(store, [job(0)])
    store.hand_off("job-0", [job(1)], error="ValueError: boom")
    assert job_ids(store) == [("job-0", "dead", '{"n": 0}'), ("job-1", "pending", '{"n": 1}')]
    assert last_error(store, "job-0") == "ValueError: boom"


def test_a_failed_hand_off_changes_nothing(store):
    """One transaction: when the insert fails, the row is still there (it is delivered again)."""
    stage(store, [job(0)])
    if isinstance(store, InMemoryStore):
        store.fail_hand_offs = 1
    bad = StagedJob("x" * 300, "task", "celery", "{}")  # longer than job_id's column (PostgreSQL)
    if store_kind(store) == "sqlite":
        bad = StagedJob("job-1", "task", "celery", None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(Exception):
        store.hand_off("job-0", [bad])
    assert [r[0] for r in job_ids(store)] == ["job-0"]


def store_kind(store):
    if isinstance(store, InMemoryStore):
        return "memory"
    return store.engine.dialect.name


def test_requeue_unfinished(store):
    """Sent rows older than the limit go back to pending, unless not yet due, or out of deliveries."""
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    stage(store, [job(0), job(1, eta=later), job(2)])
    with store.claim(10) as claim:
        claim.mark_sent([r.id for r in claim.rows])
    assert store.requeue_unfinished(60, 5) == (0, 0), "too recent"
    age_sent(store, 120)
    assert store.requeue_unfinished(60, 5) == (2, 0), "the eta job is not due yet"
    with store.claim(10) as claim:
        assert sorted(r.job_id for r in claim.rows) == ["job-0", "job-2"]
        claim.mark_sent([r.id for r in claim.rows])
    age_sent(store, 120)
    assert store.requeue_unfinished(60, 2) == (0, 2), "delivered twice already: dead"
    assert store.status().dead == 2


def stored_eta(store, job_id):
    """The row's eta as aware UTC (SQLite gives it back naive: UTC)."""
    if isinstance(store, InMemoryStore):
        (row,) = [r for r in store.rows.values() if r.job.job_id == job_id]
        return row.job.eta
    t = store.table
    with store.engine.connect() as conn:
        value = conn.execute(t.select().with_only_columns(t.c.eta).where(t.c.job_id == job_id)).scalar()
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


def test_etas_in_any_time_zone_are_stored_and_compared_as_utc(store):
    """An eta given in a zone west or east of UTC is the same instant in the store: redelivery
    waits for it (SQLite keeps no offset: a wall time would be hours off)."""
    now = datetime.now(timezone.utc)
    west = (now + timedelta(hours=1)).astimezone(ZoneInfo("America/Los_Angeles"))  # not due
    east = (now - timedelta(hours=1)).astimezone(ZoneInfo("Asia/Tokyo"))  # due
    naive = (now - timedelta(hours=1)).replace(tzinfo=None)  # naive is UTC, as Celery reads it: due
    stage(store, [job(0, eta=west), job(1, eta=east), job(2, eta=naive)])
    assert stored_eta(store, "job-0") == west
    assert stored_eta(store, "job-1") == east
    assert stored_eta(store, "job-2") == naive.replace(tzinfo=timezone.utc)
    with store.claim(10) as claim:
        claim.mark_sent([r.id for r in claim.rows])
    age_sent(store, 120)
    assert store.requeue_unfinished(60, 5) == (2, 0)
    with store.claim(10) as claim:
        assert sorted(r.job_id for r in claim.rows) == ["job-1", "job-2"]


def test_postpone_moves_a_retried_jobs_due_time(store):
    """``postpone`` (a Celery retry waiting in the worker): the row's eta becomes the retry's and
    its sent_at now, so redelivery waits for the retry's eta; dead and unknown rows are left."""
    now = datetime.now(timezone.utc)
    stage(store, [job(0), job(1), job(2)])
    with store.claim(10) as claim:
        claim.mark_sent([r.id for r in claim.rows])
    store.bury("job-2", "failed for good")
    age_sent(store, 120)  # the first attempts ran long ago

    retry_at = (now + timedelta(hours=2)).astimezone(ZoneInfo("America/Los_Angeles"))
    assert store.postpone("job-0", retry_at) == 1
    assert store.postpone("job-2", retry_at) == 0, "dead rows stay dead"
    assert store.postpone("no-such-job", retry_at) == 0
    assert stored_eta(store, "job-0") == retry_at
    assert store.requeue_unfinished(60, 5) == (1, 0), "only job-1: job-0 waits for its retry"
    with store.claim(10) as claim:
        assert [r.job_id for r in claim.rows] == ["job-1"]
        claim.mark_sent([r.id for r in claim.rows])

    # A retry already due: published now, so redelivery still waits redeliver_after from now.
    assert store.postpone("job-0", now - timedelta(seconds=120)) == 1
    assert store.requeue_unfinished(60, 5) == (0, 0)
    age_sent(store, 120)
    assert store.requeue_unfinished(60, 5) == (2, 0)
    assert store.status().as_dict()["dead"] == 1


def test_concurrent_claims_skip_locked_rows_on_postgresql(postgres_url, table_name):
    """Two claims at once never hold the same row: PostgreSQL's SKIP LOCKED.

    (SQLite has one writer at a time: a second claim waits; the fake is covered in the unit tests.)
    """
    db = SQLAlchemyDatabase(Settings(database_url=postgres_url, table_name=table_name))
    db.create_table()
    try:
        stage(db, [job(i) for i in range(4)])
        with db.claim(3) as first, db.claim(3) as second:
            assert {r.id for r in first.rows}.isdisjoint(r.id for r in second.rows)
            assert len(first.rows) + len(second.rows) == 4
    finally:
        db.table.drop(db.engine)
        db.engine.dispose()


def test_completion_survives_a_lost_connection_and_a_fork_on_postgresql(postgres_url, table_name):
    """Completion keeps one autocommit connection per process: a server-side disconnect costs a
    retry on a new connection, and a forked child never uses (or closes) its parent's."""
    import os

    from sqlalchemy import text

    db = SQLAlchemyDatabase(Settings(database_url=postgres_url, table_name=table_name))

    def kill_completion_connections() -> None:
        with db.engine.begin() as conn:
            killed = (
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE query LIKE 'DELETE FROM %' AND pid <> pg_backend_pid()"
                    )
                )
                .scalars()
                .all()
            )
        assert killed and all(killed)

    db.create_table()
    try:
        stage(db, [job(i) for i in range(4)])
        assert db.complete_many(["job-0"]) == 1
        kill_completion_connections()
        assert db.complete_many(["job-1"]) == 1, "retried on a new connection"
        stage(db, [job(10), job(11)])
        kill_completion_connections()
        assert db.complete_many(["job-10", "job-11"]) == 2, "batched: retried on a new connection"

        pid = os.fork()
        if pid == 0:  # the child: its own connection; exit without running any cleanup
            try:
                os._exit(0 if db.complete_many(["job-2"]) == 1 else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert db.complete_many(["job-3"]) == 1, "the parent's connection still works"
        assert db.status().as_dict()["pending"] == 0
    finally:
        db.close()
        db.table.drop(db.engine)
        db.engine.dispose()


def test_claims_walk_the_pending_index_even_before_analyze_on_postgresql(postgres_url, table_name):
    """On a table PostgreSQL has no statistics for yet (fresh, a burst of inserts), the claim still
    walks ix_<table>_pending in id order instead of fetching and sorting every pending row."""
    from sqlalchemy import text

    db = SQLAlchemyDatabase(Settings(database_url=postgres_url, table_name=table_name))
    db.create_table()
    try:
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {table_name} (job_id, task_name, queue, message, created_at, "
                    "updated_at) SELECT 'j' || g, 't', 'q', 'm', now(), now() "
                    "FROM generate_series(1, 20000) g"
                )
            )
        plan = "\n".join(db.explain_claim(500))
        assert f"Index Scan using ix_{table_name}_pending" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan
        with db.claim(500) as claim:
            assert [r.job_id for r in claim.rows][:3] == ["j1", "j2", "j3"]
            claim.mark_sent([r.id for r in claim.rows])
    finally:
        db.table.drop(db.engine)
        db.engine.dispose()
