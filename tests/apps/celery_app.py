"""The Celery app the end-to-end tests run in real ``celery worker`` and relay processes.

Configured from the environment the tests set:
``RJ_TEST_BROKER_URL``, ``RELIABLE_JOB_DATABASE_URL``, ``RELIABLE_JOB_TABLE_NAME`` (the outbox),
``RJ_TEST_EXECUTIONS`` (table where tasks record that they ran).
"""

from __future__ import annotations

import os
import time

from celery import Celery
from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from reliable_job.integrations.celery import install

app = Celery("rjtests", broker=os.environ.get("RJ_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    worker_hijack_root_logger=False,
    broker_transport_options={"socket_timeout": 5, "socket_connect_timeout": 2},
)
if os.environ.get("RJ_TEST_VISIBILITY_TIMEOUT"):
    # kombu restores unacknowledged messages older than this, swept every second
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "visibility_timeout": float(os.environ["RJ_TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
if os.environ.get("RJ_TEST_RESULT_BACKEND"):
    app.conf.result_backend = os.environ["RJ_TEST_RESULT_BACKEND"]
runtime = install(app)

_metadata = MetaData()
executions = Table(
    os.environ.get("RJ_TEST_EXECUTIONS", "rj_executions"),
    _metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", String(255), nullable=False),
    Column("marker", String(255), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("at", String(64), nullable=False),
)
_engine = None


def _record(task_id: str, marker: str, attempt: int = 0) -> None:
    global _engine
    if _engine is None:
        from reliable_job.integrations.sqlalchemy import create_outbox_engine

        _engine = create_outbox_engine(runtime.settings.database_url)
    with _engine.begin() as conn:
        conn.execute(
            insert(executions).values(task_id=task_id, marker=marker, attempt=attempt, at=repr(time.time()))
        )


@app.task(bind=True, reliable_job=True)
def record(self, marker):
    _record(self.request.id, marker, self.request.retries)
    return marker


@app.task(bind=True)
def plain_record(self, marker):
    """No reliable_job option: follows enable_for_all_jobs."""
    _record(self.request.id, marker)


@app.task(bind=True, reliable_job=False)
def opt_out_record(self, marker):
    _record(self.request.id, marker)


@app.task(bind=True, reliable_job=True, max_retries=3)
def fail_then_succeed(self, marker, failures=1, countdown=0.2):
    """Fails (and is retried by Celery) ``failures`` times, then records."""
    _record(self.request.id, f"{marker}:attempt", self.request.retries)
    if self.request.retries < failures:
        raise self.retry(countdown=countdown)
    _record(self.request.id, marker, self.request.retries)


@app.task(bind=True, reliable_job=True, max_retries=1)
def always_fail(self, marker, retry=False):
    _record(self.request.id, f"{marker}:attempt", self.request.retries)
    if retry:
        raise self.retry(countdown=0.1, exc=ValueError(f"boom {marker}"))
    raise ValueError(f"boom {marker}")


@app.task(bind=True, reliable_job=True)
def spawn(self, marker):
    """A job that enqueues a new reliable job from inside the worker."""
    child = record.delay(f"{marker}:child")
    _record(self.request.id, marker)
    return child.id


@app.task(bind=True, reliable_job=True)
def slow_record(self, marker, seconds=0.05):
    """Takes a moment, so that a worker can be killed in the middle of its work."""
    time.sleep(seconds)
    _record(self.request.id, marker)


@app.task(bind=True, reliable_job=True, acks_late=True)
def crash_once(self, marker, seconds=60.0):
    """``acks_late``: records its start, then takes ``seconds`` the first time it runs (so that
    its worker can be killed in the middle), no time on later runs; records its end."""
    from sqlalchemy import func, select

    _record(self.request.id, f"{marker}:start")
    with _engine.connect() as conn:
        starts = conn.execute(
            select(func.count()).select_from(executions).where(executions.c.task_id == self.request.id)
        ).scalar()
    if starts == 1:
        time.sleep(seconds)
    _record(self.request.id, marker)
