"""End to end with a real ``celery -A proj worker`` of the example project (its relay runs inside
the worker): committed jobs run once and their rows are deleted, rolled-back jobs never run, on
PostgreSQL and SQLite, on per-task database aliases, and final failures delete the row."""

from __future__ import annotations

import pytest
from django.db import transaction

from tests.conftest import wait_for
from tests.django.conftest import ALL_DATABASES, executed, flush_redis, outbox

pytestmark = [pytest.mark.django_db(transaction=True, databases=ALL_DATABASES), pytest.mark.e2e]


@pytest.fixture(scope="module")
def worker(processes, django_db_setup):
    flush_redis()
    proc = processes.worker()
    yield proc
    assert processes.stop(proc) == 0, processes.log(proc)


def settled(alias: str = "default") -> bool:
    return outbox(alias) == []


def test_atomic_commit_delivers_once_and_success_deletes_the_row(worker):
    """Committed in atomic(): the job runs exactly once and its row is deleted; a job rolled back
    with its transaction (and one dropped with an inner savepoint) never runs."""
    from tests.django.testapp.tasks import record

    with transaction.atomic():
        committed = record.delay("committed")
        with pytest.raises(RuntimeError), transaction.atomic():
            record.delay("inner rolled back")
            raise RuntimeError("inner")
    with pytest.raises(RuntimeError), transaction.atomic():
        record.delay("rolled back")
        raise RuntimeError("boom")
    record.delay_on_commit("on commit")  # outside atomic: staged and committed at once
    with transaction.atomic():
        record.delay("sentinel")  # staged after the others: claimed after them
    wait_for(
        lambda: {"committed", "on commit", "sentinel"} <= set(executed()), message="the committed jobs to run"
    )
    wait_for(settled, message="rows deleted on success")
    assert sorted(executed()) == ["committed", "on commit", "sentinel"]
    from tests.django.testapp.models import Execution

    assert list(Execution.objects.filter(marker="committed").values_list("task_id", flat=True)) == [
        committed.id
    ]


def test_sqlite_and_other_database_aliases_are_relayed(worker):
    """Jobs staged in the SQLite and in the second PostgreSQL database's outboxes are relayed by
    the worker (one relay per alias) and their rows deleted there."""
    from tests.django.testapp.tasks import record_other, record_sqlite

    with transaction.atomic(using="sqlite"):
        record_sqlite.delay("sqlite")
    with pytest.raises(RuntimeError), transaction.atomic(using="sqlite"):
        record_sqlite.delay("sqlite rolled back")
        raise RuntimeError("boom")
    with transaction.atomic(using="other"):
        record_other.delay("other")
    with pytest.raises(RuntimeError), transaction.atomic(using="other"):
        record_other.delay("other rolled back")
        raise RuntimeError("boom")
    wait_for(lambda: {"sqlite", "other"} <= set(executed()), message="both jobs to run")
    wait_for(lambda: settled("sqlite") and settled("other"), message="rows deleted")
    assert sorted(executed()) == ["other", "sqlite"]


def test_final_failure_deletes_the_row(worker):
    from tests.django.testapp.tasks import always_fail, record

    failed = always_fail.delay("failed")
    wait_for(lambda: "failed" in executed(), message="the failing job to run")
    record.delay("sentinel")
    wait_for(lambda: "sentinel" in executed(), message="the sentinel")
    wait_for(settled, message="the failed job's row deleted")
    assert executed("failed") == ["failed"]
    assert failed.id


def test_the_example_views(worker, client):
    """The example project's views: an order created in atomic() gets one receipt; the view that
    raises after enqueueing leaves neither an order nor a job."""
    from shop.models import Order, Receipt

    response = client.post("/orders/", {"item": "book"})
    assert response.status_code == 201, response.content
    order = response.json()["order"]
    wait_for(lambda: Receipt.objects.filter(order_id=order).exists(), message="the receipt")
    client.raise_request_exception = False
    assert client.post("/orders/fail/", {"item": "lamp"}).status_code == 500
    assert not Order.objects.filter(item="lamp").exists()
    response = client.post("/orders/", {"item": "pen"})
    wait_for(
        lambda: Receipt.objects.filter(order_id=response.json()["order"]).exists(),
        message="the second receipt",
    )
    wait_for(settled, message="rows deleted")
    assert list(Receipt.objects.order_by("id").values_list("order__item", "task_id")) == [
        ("book", Receipt.objects.get(order_id=order).task_id),
        ("pen", Receipt.objects.get(order_id=response.json()["order"]).task_id),
    ]
    assert Receipt.objects.count() == 2
