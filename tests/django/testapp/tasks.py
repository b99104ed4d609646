"""Tasks of the Django tests (discovered by ``autodiscover_tasks()`` in the worker)."""

from celery import shared_task

from tests.django.testapp.models import Execution


def _record(task, marker):
    Execution.objects.using("default").create(task_id=task.request.id, marker=marker)


@shared_task(bind=True, reliable_job=True)
def record(self, marker):
    _record(self, marker)


@shared_task(bind=True, reliable_job=True, reliable_job_database="other")
def record_other(self, marker):
    """Staged in the ``other`` database's outbox."""
    _record(self, marker)


@shared_task(bind=True, reliable_job=True, reliable_job_database="sqlite")
def record_sqlite(self, marker):
    """Staged in the SQLite database's outbox."""
    _record(self, marker)


@shared_task(bind=True)
def plain_record(self, marker):
    """Not reliable: Celery's own behaviour."""
    _record(self, marker)


@shared_task(bind=True, reliable_job=True)
def always_fail(self, marker):
    _record(self, marker)
    raise ValueError(f"boom {marker}")
