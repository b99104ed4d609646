"""The e2e test app (``celery_app.py``) with Celery's ``task-sent`` events on: the relay of a
worker started with ``-A tests.apps.visibility_app`` sends one for each job it publishes
(tests/e2e/test_e2e_celery_visibility.py). A module of its own, so the in-process test app of
the other tests keeps Celery's defaults."""

from __future__ import annotations

from tests.apps.celery_app import app, record, runtime

app.conf.task_send_sent_event = True

__all__ = ["app", "record", "runtime"]
