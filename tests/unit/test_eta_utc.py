"""Due times are UTC: a staged job's eta (naive, aware in any zone, or Celery's ISO header with an
offset) and a retry's due time, normalised before any store sees them (issue 9, failure 9)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from celery import Celery

from reliable_job.integrations.celery import install
from reliable_job.integrations.celery.retry import parse_eta, postpone_retry, retry_due
from reliable_job.ports import StagedJob, as_utc
from reliable_job.testing import InMemoryStore

LA = ZoneInfo("America/Los_Angeles")
INSTANT = datetime(2026, 7, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(INSTANT, id="aware-utc"),
        pytest.param(INSTANT.astimezone(LA), id="aware-west"),
        pytest.param(INSTANT.astimezone(ZoneInfo("Asia/Kolkata")), id="aware-east-half-hour"),
        pytest.param(INSTANT.astimezone(timezone(timedelta(hours=-3))), id="aware-fixed-offset"),
        pytest.param(INSTANT.replace(tzinfo=None), id="naive-is-utc"),
    ],
)
def test_as_utc_and_staged_jobs_hold_aware_utc(value: datetime) -> None:
    for normalised in (as_utc(value), StagedJob("id", "task", "q", "{}", value).eta):
        assert normalised == INSTANT
        assert normalised is not None and normalised.tzinfo is timezone.utc


def test_as_utc_keeps_none_and_utc_values() -> None:
    assert as_utc(None) is None
    assert as_utc(INSTANT) is INSTANT
    assert StagedJob("id", "task", "q", "{}").eta is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(INSTANT.isoformat(), id="iso-utc-offset"),
        pytest.param(INSTANT.astimezone(LA).isoformat(), id="iso-west-offset"),
        pytest.param("2026-07-01T21:00:00.250000+09:00", id="iso-east-offset"),
        pytest.param("2026-07-01T12:00:00.250000", id="iso-naive-is-utc"),
        pytest.param("2026-07-01T12:00:00.250000Z", id="iso-z"),
        pytest.param(INSTANT.astimezone(LA), id="datetime"),
    ],
)
def test_parse_eta_reads_celery_etas_as_utc(value: object) -> None:
    parsed = parse_eta(value)
    assert parsed == INSTANT
    assert parsed is not None and parsed.tzinfo is timezone.utc


@pytest.mark.parametrize("value", [None, "", "not a date", 42])
def test_parse_eta_without_a_readable_eta(value: object) -> None:
    assert parse_eta(value) is None


def test_retry_due_countdown_wins_then_eta_then_now() -> None:
    now = INSTANT
    assert retry_due({"countdown": 30}, now) == now + timedelta(seconds=30)
    assert retry_due({"countdown": 2.5, "eta": "2030-01-01T00:00:00+00:00"}, now) == now + timedelta(
        seconds=2.5
    )
    assert retry_due({"eta": INSTANT.astimezone(LA) + timedelta(hours=1)}, now) == now + timedelta(hours=1)
    assert retry_due({"countdown": 0, "eta": None}, now) == now
    assert retry_due({}, now) == now


def test_postpone_retry_moves_the_row_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    store.write([StagedJob("job", "task", "q", "{}")])
    postpone_retry(store, "job", {"countdown": 60}, clock=lambda: INSTANT)
    (row,) = store.rows.values()
    assert row.job.eta == INSTANT + timedelta(seconds=60)

    class Broken(InMemoryStore):
        def postpone(self, job_id: str, due: datetime) -> int:
            raise RuntimeError("database down")

    with caplog.at_level(logging.WARNING, logger="reliable_job.integrations.celery.retry"):
        postpone_retry(Broken(), "job", {"countdown": 60})
    assert "publishing the retry anyway" in caplog.text


@pytest.mark.parametrize("enable_utc", [False, True])
def test_a_countdown_staged_in_a_celery_time_zone_west_of_utc_is_stored_as_utc(enable_utc: bool) -> None:
    """Celery writes the eta header in its own time zone (with an offset); the staged row holds the
    same instant in UTC."""
    app = Celery("tz", broker="memory://", set_as_current=False)
    app.conf.update(timezone="America/Los_Angeles", enable_utc=enable_utc)
    store = InMemoryStore()
    install(app, database=store, relay_in_worker=False)

    @app.task(reliable_job=True, shared=False)
    def later() -> None: ...

    before = datetime.now(timezone.utc)
    later.apply_async(countdown=60)
    (row,) = store.rows.values()
    header = row.job.message
    assert "-07:00" in header or "-08:00" in header  # Celery's wall time in Los Angeles
    assert row.job.eta is not None and row.job.eta.tzinfo is timezone.utc
    assert before + timedelta(seconds=59) <= row.job.eta <= datetime.now(timezone.utc) + timedelta(seconds=61)
