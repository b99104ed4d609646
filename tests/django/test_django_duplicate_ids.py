"""Reused ids on Django's connections (issue 9, failure 5): staging an id already in the outbox
raises DuplicateJobError at the call, and the caller's ``atomic()`` block stays usable and commits
its other work, on PostgreSQL and SQLite."""

from __future__ import annotations

import pytest
from django.db import transaction

from reliable_job.errors import DuplicateJobError
from tests.django.conftest import ALL_DATABASES, flush_redis, outbox

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)


@pytest.fixture
def runtime():
    from proj.celery import app

    flush_redis()
    return app.reliable_job


@pytest.mark.parametrize("alias", ["default", "sqlite"])
@pytest.mark.parametrize("state", ["pending", "sent", "dead"])
def test_a_reused_id_raises_and_the_transaction_commits_its_other_work(runtime, alias, state):
    from reliable_job.integrations.django.models import OutboxJob
    from tests.django.testapp.models import Execution
    from tests.django.testapp.tasks import record, record_sqlite

    task = record if alias == "default" else record_sqlite
    task.apply_async(("first",), task_id="debounced")
    OutboxJob.objects.using(alias).filter(job_id="debounced").update(state=state)
    with transaction.atomic(using=alias):
        Execution.objects.using(alias).create(task_id="before", marker="work")
        with pytest.raises(DuplicateJobError) as raised:
            task.apply_async(("second",), task_id="debounced")
        other = task.delay("other")  # the transaction is still usable
        Execution.objects.using(alias).create(task_id="after", marker="work")
    assert raised.value.job_ids == ["debounced"]
    assert sorted(Execution.objects.using(alias).values_list("task_id", flat=True)) == ["after", "before"]
    assert sorted((job_id, st) for _, st, job_id in outbox(alias)) == sorted(
        [("debounced", state), (other.id, "pending")]
    )


def test_a_fresh_id_is_one_insert(runtime):
    """No conflict: one statement (``INSERT ... ON CONFLICT DO NOTHING RETURNING``), no extra
    round trip to tell."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.django.testapp.tasks import record

    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        record.delay("fresh")
    inserts = [q["sql"] for q in queries.captured_queries if "INSERT" in q["sql"]]
    assert len(inserts) == 1 and "ON CONFLICT" in inserts[0]
    assert [q for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")] in (
        [],
        [q for q in queries.captured_queries if "pg_notify" in q["sql"]],
    )
