"""The stored message format's version policy: a row in a format version newer than the relay
reads stays pending (neither published nor dead, attempts unchanged), is logged once, and every
other row keeps flowing. On the fakes, then on real SQLite/PostgreSQL and Redis."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import pytest
import redis as redis_lib
from sqlalchemy import update

from reliable_job.errors import UnknownMessageFormat
from reliable_job.ports import ClaimedRow, StagedJob
from reliable_job.relay import UNKNOWN_FORMAT_RETRY, Relay
from reliable_job.schema import DEAD, PENDING, SENT
from reliable_job.settings import Settings
from reliable_job.testing import InMemoryBroker, InMemoryStore
from tests.conftest import outbox_rows, stage_records

FUTURE = "reliable_job.relay"


class VersionedBroker(InMemoryBroker):
    """Reads the fake messages ``"v<N>:..."``: versions above 2 are a newer release's."""

    def publish(self, rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
        failures: dict[int, Exception] = {}
        readable = []
        for row in rows:
            version = int(row.message.split(":", 1)[0][1:])
            if version > 2:
                failures[row.id] = UnknownMessageFormat(version)
            else:
                readable.append(row)
        failures.update(super().publish(readable))
        return failures


def unknown_format_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == FUTURE
        and r.levelno >= logging.WARNING
        and "newer than this relay reads" in r.getMessage()
    ]


def test_a_row_in_a_newer_format_stays_pending_and_the_rest_flow(caplog):
    """Deferred, not failed: pending, attempts and last error unchanged, due a minute later; the
    rows around it are published; one warning per version, whatever the passes and rows."""
    caplog.set_level(logging.DEBUG, logger=FUTURE)
    store, broker = InMemoryStore(), VersionedBroker()
    messages = ["v2:a", "v99:future-1", "v2:b", "v99:future-2", "v1:c", "v3:other"]
    store.write([StagedJob(f"job-{i}", "t", "celery", m) for i, m in enumerate(messages)])
    relay = Relay(store, broker, Settings(batch_size=10))

    assert relay.run_once() == 6
    assert relay.run_once() == 0  # deferred rows are not claimed again at once
    assert broker.published == ["v2:a", "v2:b", "v1:c"]
    future = [r for r in store.rows.values() if not r.job.message.startswith(("v1:", "v2:"))]
    assert [r.job.message for r in future] == ["v99:future-1", "v99:future-2", "v3:other"]
    for row in future:
        assert row.state == PENDING
        assert row.attempts == 0
        assert row.last_error is None
        assert row.available_at > 0
    assert store.status().dead == 0

    for row in future:  # due again (a minute later): still deferred, still logged once
        row.available_at = 0.0
    assert relay.run_once() == 3
    assert all(r.state == PENDING and r.attempts == 0 for r in future)
    warnings = unknown_format_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "version 99" in warnings[0] and "version 3" in warnings[1]

    # after the upgrade (a relay that reads them), the same rows are published
    for row in future:
        row.available_at = 0.0
    upgraded = Relay(store, InMemoryBroker(), Settings(batch_size=10))
    assert upgraded.run_once() == 3
    assert all(r.state == SENT for r in store.rows.values())


def test_defer_keeps_a_row_that_already_failed_as_it_was():
    """A deferral neither counts an attempt nor clears the last error of earlier failures."""
    store = InMemoryStore()
    store.write([StagedJob("job", "t", "celery", "v2:x")])
    with store.claim(1) as claim:
        claim.mark_failed(claim.rows[0], "Boom: earlier", retry_in=0)
    with store.claim(1) as claim:
        [row] = claim.rows
        claim.defer(row, 5.0)
    [stored] = store.rows.values()
    assert (stored.state, stored.attempts, stored.last_error) == (PENDING, 1, "Boom: earlier")


@pytest.mark.parametrize(
    ("doc", "outcome"),
    [
        ({"v": 1}, 1),
        ({"v": 2}, 2),
        ({"v": 3}, "future"),
        ({"v": 99}, "future"),
        ({"v": 0}, "corrupt"),
        ({"v": -1}, "corrupt"),
        ({"v": True}, "corrupt"),
        ({"v": "3"}, "corrupt"),
        ({"v": 3.0}, "corrupt"),
        ({"v": None}, "corrupt"),
        ({}, "corrupt"),
        ([{"v": 3}], "corrupt"),
        ("v3", "corrupt"),
    ],
)
def test_format_version_tells_newer_from_corrupt(doc, outcome):
    from reliable_job.integrations.celery.message import CorruptMessage, format_version

    if outcome == "future":
        with pytest.raises(UnknownMessageFormat) as raised:
            format_version(doc)
        assert raised.value.version == doc["v"]
    elif outcome == "corrupt":
        with pytest.raises(CorruptMessage):
            format_version(doc)
    else:
        assert format_version(doc) == outcome


def future_envelope(message: str, version: int = 99) -> str:
    """A stored v2 envelope as a newer release might write it: another version, a new field."""
    assert message.startswith('{"v":2,')
    doc = json.loads(message)
    doc["v"] = version
    doc["added_in_a_later_release"] = {"anything": [1, "two"]}
    return json.dumps(doc, separators=(",", ":"))


@pytest.mark.parametrize("path", ["fast", "kombu"])
def test_a_row_in_a_newer_format_is_neither_published_nor_buried(
    celery_app, engine, outbox, redis_url, caplog, path
):
    """Real store and Redis: among good rows, a row in format version 99 stays pending with its
    attempts unchanged and a due time in the future, is not in Redis, is logged once; every other
    row is published. Through the Redis fast path and kombu's path."""
    caplog.set_level(logging.DEBUG, logger=FUTURE)
    ids = stage_records(engine, "fmt", 7)
    future_id = ids[3]
    t = outbox
    [row] = [r for r in outbox_rows(engine, outbox) if r["job_id"] == future_id]
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.job_id == future_id).values(message=future_envelope(row["message"])))

    relay = celery_app.reliable_job.relay()
    relay.broker.fast_path = path == "fast"
    before = datetime.now(timezone.utc)
    assert relay.run_once() == 7
    assert relay.run_once() == 0
    # due again (as a minute later): deferred again, not logged again
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.job_id == future_id).values(available_at=None))
    assert relay.run_once() == 1
    relay.broker.close()

    client = redis_lib.Redis.from_url(redis_url)
    try:
        relayed = [json.loads(m)["headers"]["id"] for m in client.lrange("celery", 0, -1)]
    finally:
        client.close()
    assert sorted(relayed) == sorted(i for i in ids if i != future_id)

    by_id = {r["job_id"]: r for r in outbox_rows(engine, outbox)}
    future = by_id.pop(future_id)
    assert future["state"] == PENDING
    assert future["attempts"] == 0
    assert future["last_error"] is None
    due = future["available_at"]
    due = due if due.tzinfo else due.replace(tzinfo=timezone.utc)
    assert due > before
    assert (due - before).total_seconds() <= UNKNOWN_FORMAT_RETRY + 60
    assert {r["state"] for r in by_id.values()} == {SENT}
    assert DEAD not in {r["state"] for r in outbox_rows(engine, outbox)}

    warnings = unknown_format_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert future_id in warnings[0] and "version 99" in warnings[0]


def unstamped(message: str, layout: str) -> str:
    """A stored message as reliable-job 0.1.0 wrote it (no stamp header), in one of the layouts
    relays meet: v2 exactly as written, v2 re-serialized by a tool, v1."""
    from reliable_job.integrations.celery import stamp

    doc = json.loads(message)
    doc["payload"]["headers"].pop(stamp.HEADER)
    if layout == "v2":
        text = message.replace(f', "{stamp.HEADER}": {stamp.VALUE}', "")
        assert json.loads(text) == doc, "the stamp is the only difference"
        return text
    if layout == "v2-reserialized":
        return json.dumps(doc, indent=2, sort_keys=True)
    payload = doc["payload"]  # v1: the fields of kombu's message, body as stored
    return json.dumps(
        {
            "v": 1,
            **{
                k: doc[k]
                for k in ("exchange", "routing_key", "priority", "mandatory", "immediate", "declare")
            },
            "body": payload["body"],
            "body_encoding": "base64",
            "content_type": payload["content-type"],
            "content_encoding": payload["content-encoding"],
            "headers": payload["headers"],
            "properties": {
                k: v
                for k, v in payload["properties"].items()
                if k not in ("delivery_info", "priority", "body_encoding", "delivery_tag")
            },
        }
    )


@pytest.mark.parametrize("layout", ["v2", "v2-reserialized", "v1"])
@pytest.mark.parametrize("path", ["fast", "kombu"])
def test_rows_staged_before_the_stamp_are_stamped_as_they_are_relayed(
    celery_app, engine, outbox, redis_url, path, layout
):
    """Upgrading from 0.1.0: pending rows staged without the stamp header reach Redis stamped, so
    the upgraded workers complete them (completion follows the stamp); stamped rows are unchanged."""
    from reliable_job.integrations.celery import stamp

    ids = stage_records(engine, "old", 4)
    old = set(ids[:2])
    t = outbox
    with engine.begin() as conn:
        for row in outbox_rows(engine, outbox):
            if row["job_id"] in old:
                conn.execute(
                    update(t).where(t.c.id == row["id"]).values(message=unstamped(row["message"], layout))
                )
    relay = celery_app.reliable_job.relay()
    relay.broker.fast_path = path == "fast"
    assert relay.run_once() == 4
    relay.broker.close()
    assert {r["state"] for r in outbox_rows(engine, outbox)} == {SENT}

    client = redis_lib.Redis.from_url(redis_url)
    try:
        relayed = {
            json.loads(m)["headers"]["id"]: json.loads(m)["headers"] for m in client.lrange("celery", 0, -1)
        }
    finally:
        client.close()
    assert sorted(relayed) == sorted(ids)
    for headers in relayed.values():
        assert stamp.is_stamped(headers)
        assert list(headers).count(stamp.HEADER) == 1
