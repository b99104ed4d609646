"""Several jobs in one staging call on Django's connections (one INSERT of several rows): every
fresh job is written with the row values a single staging writes, the ids already in the outbox
or given twice in the call are reported together, the transaction stays usable, and on PostgreSQL
the relays' NOTIFY rides in the same statement."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from django.db import transaction
from django.test.utils import CaptureQueriesContext

from reliable_job.errors import DuplicateJobError
from reliable_job.ports import StagedJob
from tests.django.conftest import ALL_DATABASES, flush_redis, outbox

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)


@pytest.mark.parametrize("alias", ["default", "sqlite"])
def test_a_batch_is_one_insert_and_reports_its_conflicts(alias):
    from django.db import connections
    from proj.celery import app

    from reliable_job.integrations.django.models import OutboxJob

    flush_redis()
    runtime = app.reliable_job
    runtime.database.status(alias)  # connect the relay's engine first (SQLite: WAL set up)
    stager = runtime.database.stager
    stager.stage([StagedJob("taken", "t.first", "q", '{"v":2}', None)], alias)
    due = datetime.now(timezone.utc) + timedelta(minutes=5)
    jobs = [
        StagedJob("a", "t.batch", "q1", '{"v":2,"a":1}', None),
        StagedJob("taken", "t.batch", "q1", '{"v":2}', None),
        StagedJob("b", "t.batch", "q2", '{"v":2,"b":1}', due),
        StagedJob("a", "t.batch", "q1", '{"v":2,"a":2}', None),
    ]
    if stager.notify_throttle is not None:
        stager.notify_throttle.reset()  # this call notifies (PostgreSQL)
    with transaction.atomic(using=alias), CaptureQueriesContext(connections[alias]) as queries:
        with pytest.raises(DuplicateJobError) as raised:
            stager.stage(jobs, alias)
        stager.stage([StagedJob("c", "t.after", "q", '{"v":2}', None)], alias)  # still usable
    assert raised.value.job_ids == ["taken", "a"]
    statements = [q["sql"] for q in queries.captured_queries]
    inserts = [sql for sql in statements if "INSERT" in sql]
    assert len(inserts) == 2
    assert ("pg_notify" in inserts[0]) == (alias == "default")
    assert not [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
    assert sorted(job_id for _, _, job_id in outbox(alias)) == ["a", "b", "c", "taken"]
    rows = {r.job_id: r for r in OutboxJob.objects.using(alias).all()}
    assert rows["a"].message == '{"v":2,"a":1}' and rows["a"].queue == "q1"
    assert rows["b"].state == "pending" and rows["b"].attempts == 0 and rows["b"].last_error is None
    assert rows["b"].available_at is None and rows["b"].sent_at is None
    assert rows["b"].created_at == rows["b"].updated_at
    stored_eta = rows["b"].eta if rows["b"].eta.tzinfo else rows["b"].eta.replace(tzinfo=timezone.utc)
    assert abs(stored_eta - due) < timedelta(seconds=1)
    assert rows["taken"].task_name == "t.first"
