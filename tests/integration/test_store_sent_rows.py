"""The store contract of the lost-message checks (``sent_rows``, ``requeue_sent``): the in-memory
fake, SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tests.integration.test_store_contract import age_sent, job, stage, store  # noqa: F401 (fixture)


def _send_all(store):  # noqa: F811
    with store.claim(100) as claim:
        claim.mark_sent([r.id for r in claim.rows])


def test_sent_rows_pages_sent_rows_older_than_the_limit(store):  # noqa: F811
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    stage(store, [job(0), job(1, eta=later), job(2), job(3)])
    _send_all(store)
    assert store.sent_rows(60, 0, 10, due_only=False) == [], "too recent"
    age_sent(store, 120)
    rows = store.sent_rows(60, 0, 10, due_only=False)
    assert [r.job_id for r in rows] == ["job-0", "job-1", "job-2", "job-3"]
    assert {r.attempts for r in rows} == {1}, "attempts as stored: the publication's number"
    assert rows[0].message == '{"n": 0}'
    assert [r.job_id for r in store.sent_rows(60, 0, 10, due_only=True)] == ["job-0", "job-2", "job-3"]
    page = store.sent_rows(60, 0, 2, due_only=False)
    assert [r.job_id for r in page] == ["job-0", "job-1"]
    assert [r.job_id for r in store.sent_rows(60, page[-1].id, 2, due_only=False)] == ["job-2", "job-3"]


def test_requeue_sent_only_as_checked(store):  # noqa: F811
    """A row goes back to pending only if still sent with the attempts it was checked with; out of
    deliveries, it goes dead."""
    stage(store, [job(0), job(1), job(2)])
    _send_all(store)
    age_sent(store, 120)
    rows = store.sent_rows(60, 0, 10, due_only=False)
    store.complete_many(["job-2"])
    stale = [rows[1].__class__(rows[1].id, rows[1].job_id, rows[1].message, rows[1].attempts + 1)]
    assert store.requeue_sent(stale, 5, "lost") == (0, 0), "republished since: not this publication"
    assert store.requeue_sent(rows, 5, "lost") == (2, 0), "job-2 completed meanwhile"
    assert store.requeue_sent(rows, 5, "lost") == (0, 0), "pending already: never twice"
    assert store.status().pending == 2
    _send_all(store)
    age_sent(store, 120)
    rows = store.sent_rows(60, 0, 10, due_only=False)
    assert store.requeue_sent(rows, 2, "lost") == (0, 2)
    assert store.status().dead == 2
