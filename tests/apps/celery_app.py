"""The Celery app the end-to-end tests run in real ``celery worker`` and relay processes.

Configured from the environment the tests set:
``RJ_TEST_BROKER_URL``, ``RELIABLE_JOB_DATABASE_URL``, ``RELIABLE_JOB_TABLE_NAME`` (the outbox),
``RJ_TEST_EXECUTIONS`` (table where tasks record that they ran). With ``RJ_TEST_PLAIN_ENGINE=1`` the
app is installed as the README's quickstart does: ``engine=create_engine(url)`` (plain, nothing of
reliable-job's set-up) and ``session=`` a ``scoped_session`` on it.
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
if os.environ.get("RJ_TEST_TIMEZONE"):  # Celery's time zone (tests/e2e/test_e2e_time_zones.py)
    app.conf.timezone = os.environ["RJ_TEST_TIMEZONE"]
    app.conf.enable_utc = os.environ.get("RJ_TEST_ENABLE_UTC", "1") == "1"

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
if os.environ.get("RJ_TEST_PLAIN_ENGINE") == "1":
    from sqlalchemy import create_engine
    from sqlalchemy.orm import scoped_session, sessionmaker

    plain_engine = create_engine(os.environ["RELIABLE_JOB_DATABASE_URL"])
    Session = scoped_session(sessionmaker(plain_engine))
    runtime = install(app, engine=plain_engine, session=Session)
else:
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


@app.task(
    bind=True,
    reliable_job=True,
    autoretry_for=(Exception,),
    retry_backoff=0.5,
    retry_backoff_max=2,
    retry_jitter=False,
    max_retries=60,
)
def record_until_recorded(self, marker):
    """``record``, retried while its own write fails (the database it records in is restarting):
    a job whose body fails for good is delivered, just not recorded."""
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


# -- canvas and stamp tests (tests/e2e/test_e2e_canvas.py, test_e2e_stamp.py) --------------------
# Immutable signatures (.si) or a leading marker: extra positional arguments (a previous step's
# result) are ignored. Called inline (celery.map, celery.starmap) a task has no request id.


@app.task(bind=True, reliable_job=True)
def reliable_step(self, marker, *_):
    _record(self.request.id or f"inline:{marker}", marker)
    return marker


@app.task(bind=True, reliable_job=False)
def plain_step(self, marker, *_):
    _record(self.request.id or f"inline:{marker}", marker)
    return marker


@app.task(bind=True, reliable_job=False)
def plain_fail(self, marker, *_):
    _record(self.request.id, marker)
    raise ValueError(f"boom {marker}")


# -- hand-offs (tests/e2e/test_e2e_handoff.py) --------------------------------------------------


@app.task(bind=True, reliable_job=True)
def replace_with_chain(self, marker):
    """Replaced by ``record(b) | record(c)``: Celery gives ``c`` this task's id."""
    _record(self.request.id, marker)
    return self.replace(record.si(f"{marker}:b") | record.si(f"{marker}:c"))


@app.task(bind=True, reliable_job=True)
def replace_with_one(self, marker):
    """Replaced by ``record(b)``, which takes this task's id."""
    _record(self.request.id, marker)
    return self.replace(record.si(f"{marker}:b"))


@app.task(bind=True, reliable_job=True)
def ignore_after_record(self, marker):
    from celery.exceptions import Ignore

    _record(self.request.id, marker)
    raise Ignore()


@app.task(bind=True, reliable_job=True)
def reject_after_record(self, marker, requeue=False):
    from celery.exceptions import Reject

    _record(self.request.id, marker)
    raise Reject(f"rejected {marker}", requeue=requeue)


@app.task(bind=True, reliable_job=True)
def leave_session_open(self, marker):
    """Leaves the session provider's session inside a transaction (rolled back by the
    ``task_postrun`` teardown below, as Flask-SQLAlchemy's app-context teardown does)."""
    from sqlalchemy import text

    _record(self.request.id, marker)
    assert _session is not None
    _session.execute(text("SELECT 1"))


def _raising_session():
    """Flask-SQLAlchemy's ``db.session`` outside an application context."""
    raise RuntimeError("Working outside of application context.")


_session = None
_SESSION_PROVIDER = os.environ.get("RJ_TEST_SESSION_PROVIDER")
if _SESSION_PROVIDER == "raises":
    runtime = install(app, session=_raising_session)
elif _SESSION_PROVIDER == "leaky":
    from celery import signals
    from sqlalchemy.orm import scoped_session, sessionmaker

    from reliable_job.integrations.sqlalchemy import create_outbox_engine as _outbox_engine

    _session = scoped_session(sessionmaker(_outbox_engine(runtime.settings.database_url)))
    runtime = install(app, session=_session)

    @signals.task_postrun.connect(weak=False)
    def _teardown(**_):
        _session.remove()  # rolls back what the task left open


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
