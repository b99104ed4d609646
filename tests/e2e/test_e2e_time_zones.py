"""End to end: due times are UTC whatever Celery's time zone, and a retry moves its row's due time
(issue 9, failure 9).

Redelivery republishes a ``sent`` row once both its ``sent_at`` and its ``eta`` are more than
``redeliver_after`` in the past. An eta stored as the wall time of a Celery time zone west of UTC
(SQLite keeps no offset) looks hours old at once, so a countdown job was republished every
``redeliver_after`` while its first message still waited in the worker: every copy ran at the eta.
A retry waits in the worker under the same task id; unless it moves the row's due time, the
original message is republished while the retry waits, and the job runs once more per
redelivery. Each test counts runs: a job published early runs more than once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import outbox_rows, wait_for

REDELIVER_AFTER = 4
"""Seconds: far shorter than the countdowns below, so an early redelivery happens in every run."""
COUNTDOWN = 12

ZONES = [
    pytest.param(("America/Los_Angeles", False), id="los_angeles-enable_utc_false"),
    pytest.param(("America/New_York", True), id="new_york-enable_utc_true"),
]


@pytest.fixture(params=ZONES)
def zone(
    request: pytest.FixtureRequest, celery_app, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Celery's ``timezone`` and ``enable_utc`` in this process (which stages) and in the worker
    (the environment returned, read by tests/apps/celery_app.py)."""
    name, enable_utc = request.param
    conf = celery_app.conf
    before = {"timezone": conf.timezone, "enable_utc": conf.enable_utc}
    conf.update(timezone=name, enable_utc=enable_utc)
    monkeypatch.setitem(celery_app.__dict__, "timezone", ZoneInfo(name))  # a cached property
    assert celery_app.now().utcoffset() != timedelta(0)
    yield {"RJ_TEST_TIMEZONE": name, "RJ_TEST_ENABLE_UTC": "1" if enable_utc else "0"}
    conf.update(before)


def stage(engine, task, *args, kwargs=None, **options):
    with Session(engine) as session:
        result = task.apply_async(args, kwargs, reliable_job_session=session, **options)
        session.commit()
    return result


def row_of(engine, outbox, job_id: str) -> dict[str, object] | None:
    return next((r for r in outbox_rows(engine, outbox) if r["job_id"] == job_id), None)


def as_utc(value: object) -> datetime:
    """A stored timestamp as aware UTC (SQLite gives it back naive)."""
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def runs_of(services, prefix: str) -> list[tuple[str, int, float]]:
    ex = services.executions
    with services.engine.connect() as conn:
        rows = conn.execute(select(ex.c.marker, ex.c.attempt, ex.c.at).order_by(ex.c.id)).all()
    return [(marker, attempt, float(at)) for marker, attempt, at in rows if marker.startswith(prefix)]


def settle(engine, outbox, job_id: str) -> None:
    """Wait for the row to go, then a little longer: copies published early share the job's eta,
    so they run at the same moment as the first."""
    wait_for(lambda: row_of(engine, outbox, job_id) is None, timeout=60, message="the row deleted")
    time.sleep(2.0)


def test_countdown_job_runs_once_at_its_time_in_any_celery_time_zone(
    services, celery_app, engine, outbox, zone
):
    """A countdown job staged and run with a non-UTC Celery time zone: its row's eta is the UTC
    instant; it is not republished before that instant plus ``redeliver_after``, so it runs once,
    not before its time."""
    from tests.apps.celery_app import record

    services.worker(RELIABLE_JOB_REDELIVER_AFTER=str(REDELIVER_AFTER), **zone)
    before = time.time()
    job = stage(engine, record, "later", countdown=COUNTDOWN)
    row = row_of(engine, outbox, job.id)
    assert row is not None

    wait_for(lambda: runs_of(services, "later"), timeout=60, message="the job to run")
    settle(engine, outbox, job.id)
    runs = runs_of(services, "later")
    assert len(runs) == 1, f"ran {len(runs)} times: republished before its eta"
    assert runs[0][2] >= before + COUNTDOWN
    # The same instant as Celery's eta, not a wall time hours away from it.
    assert abs(as_utc(row["eta"]).timestamp() - (before + COUNTDOWN)) < 60


def test_retry_longer_than_redeliver_after_is_not_redelivered_meanwhile(
    services, celery_app, engine, outbox, zone
):
    """A task retried with a countdown longer than ``redeliver_after`` runs twice (the attempt and
    the retry), not once more per redelivery: the retry moved its row's due time to the retry's
    eta (UTC) before it was published. The row ends deleted."""
    from tests.apps.celery_app import fail_then_succeed

    services.worker(RELIABLE_JOB_REDELIVER_AFTER=str(REDELIVER_AFTER), **zone)
    job = stage(engine, fail_then_succeed, "retried", kwargs={"failures": 1, "countdown": COUNTDOWN})
    first = wait_for(lambda: runs_of(services, "retried:attempt"), timeout=60, message="the first attempt")

    def postponed() -> datetime | None:
        row = row_of(engine, outbox, job.id)
        return as_utc(row["eta"]) if row is not None and row["eta"] is not None else None

    try:
        due: datetime | None = wait_for(postponed, timeout=5, message="the row's eta moved")
    except TimeoutError:
        due = None

    wait_for(lambda: ("retried", 1) in [(m, a) for m, a, _ in runs_of(services, "retried")], timeout=60)
    settle(engine, outbox, job.id)
    runs = [(marker, attempt) for marker, attempt, _ in runs_of(services, "retried")]
    assert runs == [("retried:attempt", 0), ("retried:attempt", 1), ("retried", 1)]
    assert outbox_rows(engine, outbox) == []
    assert due is not None, "the retry did not move its row's eta"
    assert abs(due.timestamp() - (first[0][2] + COUNTDOWN)) < 60  # the UTC instant, not a wall time
