"""What docs/operating/celery-visibility.md says, in-process: Celery's publish signals fire at
staging (in the transaction, even one that rolls back) and not when the relay publishes; the
relay's figures for ``celery inspect stats``; the ``task-sent`` fields read from a stored message."""

from __future__ import annotations

from celery import signals
from sqlalchemy.orm import Session

from reliable_job.errors import BrokerUnavailable
from reliable_job.integrations.celery import sent_events, visibility
from reliable_job.ports import ClaimedRow
from reliable_job.relay import Relay, RelayGroup
from reliable_job.settings import Settings
from reliable_job.testing import InMemoryBroker, InMemoryStore
from tests.conftest import count_rows, outbox_rows


def test_publish_signals_fire_at_staging_not_when_the_relay_publishes(celery_app, engine, outbox):
    from tests.apps.celery_app import record

    seen: list[tuple[str, str]] = []

    def before(headers=None, **_):
        seen.append(("before", headers["id"]))

    def after(headers=None, **_):
        seen.append(("after", headers["id"]))

    signals.before_task_publish.connect(before, weak=False)
    signals.after_task_publish.connect(after, weak=False)
    try:
        with Session(engine) as session:
            rolled_back = record.apply_async(("rb",), reliable_job_session=session).id
            assert seen == [("before", rolled_back), ("after", rolled_back)], "inside the transaction"
            session.rollback()
        assert count_rows(engine, outbox) == 0
        with Session(engine) as session:
            committed = record.apply_async(("c",), reliable_job_session=session).id
            session.commit()
        relay = celery_app.reliable_job.relay()
        assert relay.run_once() == 1
        assert [row["state"] for row in outbox_rows(engine, outbox)] == ["sent"]
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen[2:] == [("before", committed), ("after", committed)], "not again by the relay"


def test_task_sent_fields_from_a_stored_message(celery_app, engine, outbox):
    from tests.apps.celery_app import record

    with Session(engine) as session:
        job = record.apply_async((), {"marker": "m"}, reliable_job_session=session, countdown=60).id
        session.commit()
    [row] = outbox_rows(engine, outbox)
    fields = sent_events.event_fields(ClaimedRow(int(row["id"]), job, str(row["message"]), 0))
    assert fields is not None
    assert fields["uuid"] == job and fields["name"] == "tests.apps.celery_app.record"
    assert fields["args"] == "()" and fields["kwargs"] == "{'marker': 'm'}"
    assert fields["eta"] is not None and fields["queue"] == "celery"
    assert sent_events.event_fields(ClaimedRow(1, "x", "not json", 0)) is None


def test_relay_stats():
    settings = Settings(poll_interval=0.01, backoff_cap=0.01)
    relay = Relay(InMemoryStore(settings), InMemoryBroker(), settings)
    assert visibility.relay_stats(None)["relays"] == 0
    figures = visibility.relay_stats(relay)
    assert figures == {
        "published": 0,
        "mode": "polling",
        "outage_since": None,
        "last_pass": None,
        "relays": 1,
    }
    relay._on_outage(BrokerUnavailable("down"))
    assert visibility.relay_stats(relay)["outage_since"] is not None
    relay._on_success()
    figures = visibility.relay_stats(relay)
    assert figures["outage_since"] is None and figures["last_pass"] is not None
    other = Relay(InMemoryStore(settings), InMemoryBroker(), settings)
    other.published = 3
    group = visibility.relay_stats(RelayGroup([relay, other]))
    assert group["relays"] == 2 and group["published"] == 3
    assert group["last_pass"] is None, "one relay never passed: the least recent pass is none"
