"""Django's writer stores UTC whatever ``USE_TZ`` and ``TIME_ZONE`` (issue 9, failure 9).

The relay's SQLAlchemy store compares etas and ages with UTC. With ``USE_TZ = False`` Django hands
PostgreSQL naive values, which the session reads in ``TIME_ZONE``; on SQLite with ``USE_TZ = True``
Django stores wall times in ``DATABASES[alias]["TIME_ZONE"]``. Either way a naive UTC value would
land hours away from the instant. Each case stages a countdown job through Django and reads the
row back through the relay's store.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.db import connections
from django.test import override_settings
from sqlalchemy import select

from tests.django.conftest import ALL_DATABASES, flush_redis

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)

WEST = "America/Los_Angeles"
COUNTDOWN = 600


def stored(runtime, alias: str, job_id: str) -> dict[str, datetime]:
    """The row's timestamps as the relay's store reads them, as aware UTC."""
    store = runtime.database.store(alias)
    t = store.table
    with store.engine.connect() as conn:
        row = conn.execute(select(t.c.eta, t.c.created_at, t.c.updated_at).where(t.c.job_id == job_id)).one()
    return {
        name: value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        for name, value in row._mapping.items()
    }


@pytest.mark.parametrize("alias", ["default", "sqlite"])
@pytest.mark.parametrize(
    "use_tz, database_zone",
    [
        pytest.param(False, None, id="use_tz_false"),
        pytest.param(True, None, id="use_tz_true"),
        pytest.param(True, WEST, id="use_tz_true-database_time_zone"),
    ],
)
def test_staged_times_are_utc_whatever_use_tz_and_time_zone(alias, use_tz, database_zone, monkeypatch):
    """A countdown job staged with ``TIME_ZONE`` west of UTC (and ``USE_TZ`` either way, or the
    database's own ``TIME_ZONE``): the row's eta is the job's due instant and its created_at and
    updated_at the staging instant, in UTC, on PostgreSQL and SQLite."""
    from proj.celery import app

    from tests.django.testapp.tasks import record, record_sqlite

    flush_redis()
    runtime = app.reliable_job
    task = record if alias == "default" else record_sqlite
    runtime.database.status(alias)  # connect the relay's engine first (SQLite: WAL set up)
    with override_settings(USE_TZ=use_tz, TIME_ZONE=WEST):  # resets the connections' time zone
        connection = connections[alias]
        if database_zone is not None:
            # DATABASES[alias]["TIME_ZONE"] as Django reads it (a cached property of the connection)
            monkeypatch.setitem(connection.__dict__, "timezone", ZoneInfo(database_zone))
        before = datetime.now(timezone.utc)
        result = task.apply_async(("later",), countdown=COUNTDOWN)  # committed at once
        after = datetime.now(timezone.utc)
    row = stored(runtime, alias, result.id)
    slack = timedelta(seconds=1)  # SQLite keeps microseconds; this is about hours, not them
    assert (
        before + timedelta(seconds=COUNTDOWN) - slack
        <= row["eta"]
        <= after + timedelta(seconds=COUNTDOWN) + slack
    )
    assert before - slack <= row["created_at"] <= after + slack
    assert row["updated_at"] == row["created_at"]
    runtime.database.complete_many([result.id])


def test_postpone_finds_the_row_in_whichever_database_holds_it():
    """A retry's new due time (``DjangoOutbox.postpone``) reaches the row in its task's alias."""
    from proj.celery import app

    from tests.django.testapp.tasks import record_sqlite

    flush_redis()
    runtime = app.reliable_job
    runtime.database.status("sqlite")
    result = record_sqlite.delay("retried")
    due = (datetime.now(timezone.utc) + timedelta(hours=1)).astimezone(ZoneInfo(WEST))
    assert runtime.database.postpone(result.id, due) == 1
    assert stored(runtime, "sqlite", result.id)["eta"] == due
    assert runtime.database.postpone("no-such-job", due) == 0
    runtime.database.complete_many([result.id])
