"""A poison row never stalls the relay: a stored message with a field of the wrong type, among good
rows, is that row's failure (retried, then dead with its error) while every other row is
published; a stored envelope a tool re-serialized is published as the fast path would. On real
SQLite/PostgreSQL and Redis, through the Redis fast path and kombu's path."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis as redis_lib
from sqlalchemy import update
from sqlalchemy.orm import Session

from reliable_job.integrations.celery.message import redis_parts
from reliable_job.schema import DEAD, PENDING, SENT
from tests.conftest import install_test_app, outbox_rows, stage_records

MAX_ATTEMPTS = 2


@pytest.fixture
def poison_app(database_url, table_name, redis_url, outbox, monkeypatch):
    """The test app with few publish attempts and a short backoff, so poison rows die quickly."""
    app, runtime = install_test_app(
        database_url, table_name, redis_url, max_publish_attempts=MAX_ATTEMPTS, backoff_cap=0.05
    )
    yield app
    runtime.database.engine.dispose()


def set_message(engine, outbox, job_id: str, message: str) -> None:
    t = outbox
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.job_id == job_id).values(message=message))


def message_of(engine, outbox, job_id: str) -> str:
    return next(r["message"] for r in outbox_rows(engine, outbox) if r["job_id"] == job_id)


def drain(app, engine, outbox, *, fast: bool = True, passes: int = 40) -> None:
    """Relay passes until no row is pending (a row deferred for a newer format stays pending)."""
    relay = app.reliable_job.relay()
    relay.broker.fast_path = fast
    try:
        for _ in range(passes):
            relay.run_once()
            if not any(r["state"] == PENDING for r in outbox_rows(engine, outbox)):
                return
            time.sleep(0.06)  # past the backoff (cap 0.05 s)
    finally:
        relay.broker.close()


def redis_messages(redis_url: str) -> dict[str, list[bytes]]:
    """Every message in the test Redis's queue lists, by task id."""
    client = redis_lib.Redis.from_url(redis_url)
    found: dict[str, list[bytes]] = {}
    try:
        for key in client.keys("*"):
            if client.type(key) == b"list" and key != b"unacked_mutex":
                for raw in client.lrange(key, 0, -1):
                    found.setdefault(json.loads(raw)["headers"]["id"], []).append(raw)
    finally:
        client.close()
    return found


def with_field(message: str, field: str, value: object) -> str:
    """The stored v2 envelope with one top-level field replaced, in the layout the stager writes
    (so it still looks like a v2 envelope to the fast path's slicing)."""
    parts = redis_parts(message)
    assert parts is not None
    route = json.loads(parts[0])
    payload = parts[1] + '"}}'
    if field == "payload":
        return json.dumps({**route, "payload": value}, separators=(",", ":"), ensure_ascii=False)
    route[field] = value
    head = json.dumps(route, separators=(",", ":"), ensure_ascii=False)
    return f'{head[:-1]},"payload":{payload}}}'


VALUES = {
    "null": None,
    "number": 7,
    "float": 1.5,
    "bool": True,
    "string": "x",
    "list": [1, "a", {"b": None}],
    "object": {"a": [1, {"b": "c"}]},
    "huge": "h" * 200_000,
    "non-ascii": "é✓漢字🙂",
}
FIELDS = ["v", "exchange", "routing_key", "priority", "mandatory", "immediate", "declare", "payload"]


def expected(field: str, kind: str) -> str:
    """What becomes of the row: ``published`` (in Redis), ``sent`` (valid, routed where kombu
    routes it), ``unroutable`` (valid, but kombu would route it to no queue: dead, never marked
    sent), ``deferred`` (a newer format version) or ``dead``."""
    value = VALUES[kind]
    if field == "v":
        return "deferred" if kind == "number" else "dead"
    if field == "exchange":  # an exchange no queue is bound to: kombu would drop the message
        return "unroutable" if isinstance(value, str) else "dead"
    if field == "routing_key":
        return "sent" if isinstance(value, str) else "dead"
    if field == "priority":
        return "published" if kind in ("null", "number") else "dead"
    if field in ("mandatory", "immediate"):
        return "published" if kind in ("null", "bool") else "dead"
    return "dead"  # declare: a list of strings only; payload: kombu's message only


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize("field", FIELDS)
def test_a_field_of_the_wrong_type_fails_only_its_row(poison_app, engine, outbox, redis_url, field, kind):
    ids = stage_records(engine, f"{field}-{kind}-", 7)
    bad = ids[3]
    set_message(engine, outbox, bad, with_field(message_of(engine, outbox, bad), field, VALUES[kind]))

    drain(poison_app, engine, outbox)

    published = redis_messages(redis_url)
    good = [i for i in ids if i != bad]
    assert set(good) <= set(published)
    rows = {r["job_id"]: r for r in outbox_rows(engine, outbox)}
    assert {rows[i]["state"] for i in good} == {SENT}
    row = rows[bad]
    outcome = expected(field, kind)
    if outcome == "dead":
        assert row["state"] == DEAD
        assert row["attempts"] == MAX_ATTEMPTS
        assert "CorruptMessage" in row["last_error"]
        assert len(row["last_error"]) < 1000
        assert bad not in published
    elif outcome == "unroutable":
        assert row["state"] == DEAD
        assert "MessageUnroutable" in row["last_error"]
        assert bad not in published
    elif outcome == "deferred":
        assert (row["state"], row["attempts"], row["last_error"]) == (PENDING, 0, None)
        assert bad not in published
    else:
        assert row["state"] == SENT, row["last_error"]
        if outcome == "published":
            assert len(published[bad]) == 1


@pytest.mark.parametrize("poison", ["declare", "priority", "not-an-object", "deep"])
def test_one_poison_row_among_a_thousand_never_stalls_the_relay(
    poison_app, engine, outbox, redis_url, caplog, poison
):
    """The issue's case: 1,001 pending rows, one with valid JSON of the wrong shape; the relay
    publishes the other 1,000 and never logs a failed pass."""
    caplog.set_level(logging.WARNING)
    ids = stage_records(engine, "many", 1001)
    bad = ids[500]
    message = message_of(engine, outbox, bad)
    poisoned = {
        "declare": with_field(message, "declare", ["celery", 1, {"a": 1}, None]),
        "priority": with_field(message, "priority", {"high": True}),
        "not-an-object": json.dumps([json.loads(message)]),
        "deep": "[" * 100_000 + "]" * 100_000,
    }[poison]
    set_message(engine, outbox, bad, poisoned)

    drain(poison_app, engine, outbox)

    published = redis_messages(redis_url)
    assert set(published) == set(ids) - {bad}
    rows = {r["job_id"]: r for r in outbox_rows(engine, outbox)}
    assert rows[bad]["state"] == DEAD
    assert "CorruptMessage" in rows[bad]["last_error"]
    assert sum(r["state"] == SENT for r in rows.values()) == 1000
    assert "relay pass failed" not in caplog.text


RESERIALIZE = {
    "indent": lambda doc: json.dumps(doc, indent=2),
    "sort_keys": lambda doc: json.dumps(doc, sort_keys=True),
    "spaces": lambda doc: json.dumps(doc),
    "compact-non-ascii": lambda doc: json.dumps(doc, separators=(",", ":"), ensure_ascii=False),
}


@pytest.mark.parametrize("path", ["fast", "kombu"])
@pytest.mark.parametrize("style", list(RESERIALIZE))
def test_a_reserialized_envelope_is_published_as_the_fast_path_would(
    poison_app, engine, outbox, redis_url, path, style
):
    """Same content, other spacing or key order (as a SQL tool writes JSON): the row is decoded
    and published with the same Redis payload content the fast path pushes for the stored text
    (byte for byte when the key order is kept)."""
    from tests.apps.celery_app import record

    ids = stage_records(engine, "re", 3)
    with Session(engine) as session:  # a message with non-ASCII text and a priority
        ids.append(record.apply_async(("é✓漢字",), priority=3, reliable_job_session=session).id)
        session.commit()
    originals = {i: message_of(engine, outbox, i) for i in ids}
    for job_id in ids[1:]:
        set_message(engine, outbox, job_id, RESERIALIZE[style](json.loads(originals[job_id])))

    drain(poison_app, engine, outbox, fast=path == "fast")

    rows = {r["job_id"]: r for r in outbox_rows(engine, outbox)}
    assert {r["state"] for r in rows.values()} == {SENT}, [r["last_error"] for r in rows.values()]
    published = redis_messages(redis_url)
    for job_id in ids:
        [raw] = published[job_id]
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        assert tag
        parts = redis_parts(originals[job_id])
        assert parts is not None
        fast_path_payload = f'{parts[1]}{tag}"}}}}'
        assert message == json.loads(fast_path_payload)
        if style != "sort_keys":
            assert raw.decode() == fast_path_payload
