"""The outbox in Django's admin: list, filters, retry-dead and discard actions, a read-only view
of the stored message as escaped text, no add or edit."""

from __future__ import annotations

import html

import pytest

from tests.django.conftest import outbox

pytestmark = pytest.mark.django_db(transaction=True, databases=["default"])

URL = "/admin/reliable_job/outboxjob/"


@pytest.fixture
def rows():
    """Three staged jobs: pending (record), dead (always_fail), sent (record)."""
    from reliable_job.integrations.django.models import OutboxJob
    from tests.django.testapp.tasks import always_fail, record

    pending, dead, sent = record.delay("p").id, always_fail.delay("d").id, record.delay("s").id
    OutboxJob.objects.filter(job_id=dead).update(state="dead", attempts=5, last_error="ValueError: boom d")
    OutboxJob.objects.filter(job_id=sent).update(state="sent", attempts=1)
    return {row.job_id: row.pk for row in OutboxJob.objects.all()} | {
        "pending": pending,
        "dead": dead,
        "sent": sent,
    }


def listed(content: bytes) -> set[str]:
    from reliable_job.integrations.django.models import OutboxJob

    text = content.decode()
    return {
        job_id
        for job_id in OutboxJob.objects.values_list("job_id", flat=True)
        if f"{URL}{OutboxJob.objects.get(job_id=job_id).pk}/" in text
    }


def test_list_shows_state_task_queue_age_attempts_error(admin_client, rows):
    response = admin_client.get(URL)
    assert response.status_code == 200
    text = response.content.decode()
    for header in ("State", "Task name", "Queue", "Age", "Attempts", "Last error"):
        assert f">{header}<" in text, header
    assert "tests.django.testapp.tasks.always_fail" in text
    assert "ValueError: boom d" in text
    assert listed(response.content) == {rows["pending"], rows["dead"], rows["sent"]}


def test_filters_by_state_and_task(admin_client, rows):
    assert listed(admin_client.get(URL, {"state__exact": "dead"}).content) == {rows["dead"]}
    by_task = admin_client.get(URL, {"task_name__exact": "tests.django.testapp.tasks.record"})
    assert listed(by_task.content) == {rows["pending"], rows["sent"]}


def test_retry_dead_action_only_touches_dead_rows(admin_client, rows):
    pks = [rows[rows[name]] for name in ("pending", "dead", "sent")]
    response = admin_client.post(URL, {"action": "retry_dead", "_selected_action": pks}, follow=True)
    assert response.status_code == 200
    assert "1 dead job(s) back to pending." in response.content.decode()
    assert {job_id: state for _, state, job_id in outbox()} == {
        rows["pending"]: "pending",
        rows["dead"]: "pending",
        rows["sent"]: "sent",
    }


def test_discard_action_deletes_the_selected_rows(admin_client, rows):
    pks = [rows[rows["dead"]], rows[rows["sent"]]]
    response = admin_client.post(URL, {"action": "discard", "_selected_action": pks}, follow=True)
    assert "2 job(s) discarded." in response.content.decode()
    assert [job_id for _, _, job_id in outbox()] == [rows["pending"]]
    assert "delete_selected" not in admin_client.get(URL).content.decode()


def test_change_view_is_read_only_and_shows_the_message_as_text(admin_client, rows):
    """The stored JSON is shown as escaped text, never decoded or run; no form to save, no add."""
    from reliable_job.integrations.django.models import OutboxJob

    row = OutboxJob.objects.get(job_id=rows["dead"])
    row_url = f"{URL}{row.pk}/change/"
    response = admin_client.get(row_url)
    assert response.status_code == 200
    text = response.content.decode()
    assert html.escape(row.message) in text  # the stored text, whatever its envelope version
    assert 'name="_save"' not in text
    OutboxJob.objects.filter(pk=row.pk).update(message="<script>alert(1)</script> not JSON")
    text = admin_client.get(row_url).content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; not JSON" in text
    assert "<script>alert(1)" not in text
    assert admin_client.post(row_url, {"state": "pending"}).status_code == 403
    assert OutboxJob.objects.get(pk=row.pk).state == "dead"
    assert admin_client.get(f"{URL}add/").status_code == 403
