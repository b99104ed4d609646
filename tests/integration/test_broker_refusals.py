"""Only a lost connection or a timeout is an outage: whatever Redis or the relay refuses for one row
or one queue key (WRONGTYPE, OOM, MISCONF, an unknown queue, an exchange that routes nowhere) fails
just those rows, retried then dead with the error, while every other row is published exactly once.
On real SQLite/PostgreSQL and Redis, through the Redis fast path and kombu's path."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_lib
from celery.exceptions import QueueNotFound
from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session

from reliable_job.errors import BrokerUnavailable
from reliable_job.integrations.celery.broker import is_outage
from reliable_job.schema import DEAD, PENDING, SENT
from tests.conftest import install_test_app, outbox_rows, wait_for

MAX_ATTEMPTS = 3


def make_app(database_url: str, table_name: str, redis_url: str):
    return install_test_app(
        database_url, table_name, redis_url, max_publish_attempts=MAX_ATTEMPTS, backoff_cap=0.05
    )


@pytest.fixture
def refusal_app(database_url, table_name, redis_url, outbox):
    app, runtime = make_app(database_url, table_name, redis_url)
    yield app
    runtime.database.engine.dispose()


def stage(engine, prefix: str, count: int, **options) -> list[str]:
    from tests.apps.celery_app import record

    with Session(engine) as session:
        ids = [
            record.apply_async((f"{prefix}{i}",), reliable_job_session=session, **options).id
            for i in range(count)
        ]
        session.commit()
    return ids


def passes(app, count: int, *, fast: bool, relay=None) -> None:
    """``count`` relay passes, each after the backoff of the last (cap 0.05 s)."""
    own = relay is None
    relay = relay or app.reliable_job.relay()
    relay.broker.fast_path = fast
    try:
        for _ in range(count):
            relay.run_once()  # never BrokerUnavailable: a refusal is no outage
            time.sleep(0.06)
    finally:
        if own:
            relay.broker.close()


def by_job(engine, outbox) -> dict[str, dict[str, object]]:
    return {str(r["job_id"]): r for r in outbox_rows(engine, outbox)}


def queued(redis_url: str) -> dict[str, int]:
    """How many copies of each task id the Redis lists hold."""
    client = redis_lib.Redis.from_url(redis_url)
    found: dict[str, int] = {}
    try:
        for key in client.keys("*"):
            if client.type(key) == b"list":
                for raw in client.lrange(key, 0, -1):
                    task_id = json.loads(raw)["headers"]["id"]
                    found[task_id] = found.get(task_id, 0) + 1
    finally:
        client.close()
    return found


# -- the classifier ------------------------------------------------------------------------------


def test_classifier_outages_and_refusals():
    from kombu.exceptions import InconsistencyError
    from kombu.transport.redis import Transport

    transport_errors = tuple(Transport.connection_errors)
    outages = [
        redis_lib.ConnectionError("Connection refused"),
        redis_lib.TimeoutError("Timeout reading from socket"),
        redis_lib.exceptions.BusyLoadingError("LOADING"),
        redis_lib.exceptions.AuthenticationError("NOAUTH"),
        redis_lib.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        ConnectionRefusedError(111, "refused"),
        TimeoutError("timed out"),
        OperationalError("connection lost"),
    ]
    refusals = [
        redis_lib.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis_lib.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        redis_lib.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
        redis_lib.exceptions.NoScriptError("NOSCRIPT No matching script."),
        KeyError("celery"),
        QueueNotFound("Queue 'later' missing from task_queues"),
        InconsistencyError("Cannot route message for exchange 'x'"),
        ValueError("anything else"),
    ]
    for exc in outages:
        assert is_outage(exc, transport_errors), exc
    for exc in refusals:
        assert not is_outage(exc, transport_errors), exc
    # kombu's batch raises BatchPublishError from the redis error: the original error decides
    from kombu.exceptions import BatchPublishError

    for cause, outage in ((redis_lib.ConnectionError("lost"), True), (redis_lib.ResponseError("OOM"), False)):
        try:
            try:
                raise cause
            except Exception as exc:
                raise BatchPublishError("Redis publish batch failed") from exc
        except BatchPublishError as wrapped:
            assert is_outage(wrapped, transport_errors) is outage


# -- WRONGTYPE: one queue's key is a string ------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_wrongtype_fails_only_that_queues_rows(refusal_app, engine, outbox, redis_url, fast):
    client = redis_lib.Redis.from_url(redis_url)
    client.set("blocked", "not a list")
    good = stage(engine, "ok-", 30)
    blocked = stage(engine, "blocked-", 7, queue="blocked")
    more = stage(engine, "ok2-", 30)

    passes(refusal_app, MAX_ATTEMPTS + 3, fast=fast)

    rows = by_job(engine, outbox)
    copies = queued(redis_url)
    for job in good + more:
        assert rows[job]["state"] == SENT
        assert copies.get(job) == 1, job
    for job in blocked:
        assert rows[job]["state"] == DEAD
        assert rows[job]["attempts"] == MAX_ATTEMPTS
        assert "WRONGTYPE" in str(rows[job]["last_error"])
        assert job not in copies
    assert client.llen("celery") == len(good) + len(more)
    assert client.get("blocked") == b"not a list"
    client.close()


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_unreadable_binding_table_fails_only_that_exchanges_rows(
    refusal_app, engine, outbox, redis_url, fast
):
    """The binding table of one exchange is a key of the wrong type: its rows fail, the others go.
    (Celery's default routing publishes to the anonymous exchange, which reads no binding table:
    these rows name their exchange.)"""
    via = {"queue": "other", "exchange": "other", "routing_key": "other"}
    good = stage(engine, "ok-", 10)
    other = stage(engine, "other-", 4, **via)
    client = redis_lib.Redis.from_url(redis_url)
    relay = refusal_app.reliable_job.relay()  # one relay: queues stay declared on its connection
    try:
        passes(refusal_app, 1, fast=fast, relay=relay)  # declares both queues (binding tables)
        assert all(by_job(engine, outbox)[j]["state"] == SENT for j in good + other)
        client.delete("_kombu.binding.other")
        client.set("_kombu.binding.other", "x")
        more = stage(engine, "ok2-", 10)
        other2 = stage(engine, "other2-", 4, **via)
        passes(refusal_app, MAX_ATTEMPTS + 2, fast=fast, relay=relay)
    finally:
        relay.broker.close()

    rows = by_job(engine, outbox)
    copies = queued(redis_url)
    for job in good + other + more:
        assert rows[job]["state"] == SENT and copies.get(job) == 1
    for job in other2:
        assert rows[job]["state"] == DEAD
        assert "WRONGTYPE" in str(rows[job]["last_error"])
        assert job not in copies
    client.close()


# -- an exchange that routes nowhere; an unknown queue -------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_unroutable_rows_fail_instead_of_being_marked_sent(refusal_app, engine, outbox, redis_url, fast):
    """kombu's Redis transport (and Celery's own publish) silently drops a message whose exchange
    has no binding for its routing key: the relay fails the row rather than mark it sent."""
    good = stage(engine, "ok-", 10)
    nowhere = stage(engine, "nowhere-", 3, exchange="nowhere", routing_key="nowhere")
    unbound = stage(engine, "unbound-", 3, exchange="celery", routing_key="no-such-key")

    passes(refusal_app, MAX_ATTEMPTS + 2, fast=fast)

    rows = by_job(engine, outbox)
    copies = queued(redis_url)
    for job in good:
        assert rows[job]["state"] == SENT and copies.get(job) == 1
    for job in nowhere + unbound:
        assert rows[job]["state"] == DEAD, rows[job]
        assert "MessageUnroutable" in str(rows[job]["last_error"])
        assert job not in copies
    assert "'nowhere'" in str(rows[nowhere[0]]["last_error"])
    assert "'no-such-key'" in str(rows[unbound[0]]["last_error"])


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_unknown_queue_fails_alone_when_missing_queues_are_not_created(
    refusal_app, engine, outbox, redis_url, fast
):
    from tests.apps.celery_app import record

    good = stage(engine, "ok-", 10)
    later = stage(engine, "later-", 3, queue="later")  # the app creates it now...
    queues = refusal_app.amqp.queues
    saved = queues.pop("later")
    previous = (refusal_app.conf.task_create_missing_queues, queues.create_missing)
    refusal_app.conf.task_create_missing_queues = False
    queues.create_missing = False  # ...and no longer knows it when the relay runs
    try:
        with pytest.raises(QueueNotFound), Session(engine) as session:
            record.apply_async(("direct",), queue="later-still", reliable_job_session=session)
        passes(refusal_app, MAX_ATTEMPTS + 2, fast=fast)
    finally:
        refusal_app.conf.task_create_missing_queues, queues.create_missing = previous
        queues["later"] = saved
    rows = by_job(engine, outbox)
    copies = queued(redis_url)
    for job in good:
        assert rows[job]["state"] == SENT and copies.get(job) == 1
    for job in later:
        assert rows[job]["state"] == DEAD
        assert "KeyError: 'later'" in str(rows[job]["last_error"])
        assert job not in copies


# -- server-wide refusals: OOM, MISCONF ----------------------------------------------------------


@pytest.fixture
def own_redis_app(database_url, table_name, outbox, redis_server):
    app, runtime = make_app(database_url, table_name, redis_server.url)
    yield app, redis_server
    runtime.database.engine.dispose()


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_oom_fails_rows_with_backoff_and_loses_nothing(own_redis_app, engine, outbox, fast):
    """OOM under ``noeviction`` refuses every write: rows fail with backoff (no outage), then die;
    once memory is back and dead rows are retried, every row is published exactly once."""
    app, server = own_redis_app
    client = server.client()
    passes(app, 1, fast=fast)  # the relay connects before Redis is full
    jobs = stage(engine, "oom-", 20) + stage(engine, "oom-other-", 5, queue="other")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        passes(app, MAX_ATTEMPTS + 1, fast=fast)
        rows = by_job(engine, outbox)
        assert {rows[j]["state"] for j in jobs} == {DEAD}
        assert all("OutOfMemoryError" in str(rows[j]["last_error"]) for j in jobs)
    finally:
        client.config_set("maxmemory", "0")
    assert queued(server.url) == {}
    assert app.reliable_job.database.retry_dead() == len(jobs)
    passes(app, 2, fast=fast)
    rows = by_job(engine, outbox)
    assert {rows[j]["state"] for j in jobs} == {SENT}
    assert queued(server.url) == dict.fromkeys(jobs, 1)
    client.close()


@pytest.mark.redis
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "kombu-path"])
def test_misconf_fails_rows_then_they_are_published(own_redis_app, engine, outbox, tmp_path, fast):
    """MISCONF: a failed background save stops writes while a save point is configured (the dump
    file's name is taken by a directory, so the save fails even as root). A connected relay's
    pushes are refused row by row; a relay connecting meanwhile meets an outage (Redis refuses the
    connection's PING too), and leaves the rows as they are."""
    app, server = own_redis_app
    client = server.client()
    relay = app.reliable_job.relay()
    passes(app, 1, fast=fast, relay=relay)  # connected before the failed save
    jobs = stage(engine, "misconf-", 10)
    (tmp_path / "dump.rdb").mkdir()
    client.config_set("stop-writes-on-bgsave-error", "yes")
    client.config_set("save", "3600 1")
    try:
        client.bgsave()
        wait_for(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err", timeout=10)
        passes(app, 2, fast=fast, relay=relay)
        rows = by_job(engine, outbox)
        assert {rows[j]["state"] for j in jobs} == {PENDING}
        assert {rows[j]["attempts"] for j in jobs} == {2}
        assert all("MISCONF" in str(rows[j]["last_error"]) for j in jobs)
        time.sleep(0.1)
        fresh = app.reliable_job.relay()
        with pytest.raises(BrokerUnavailable):
            fresh.run_once()
        fresh.broker.close()
        assert {r["attempts"] for r in outbox_rows(engine, outbox)} == {2}
    finally:
        client.config_set("save", "")
    try:
        passes(app, 3, fast=fast, relay=relay)
    finally:
        relay.broker.close()
    assert {r["state"] for r in outbox_rows(engine, outbox)} == {SENT}
    assert queued(server.url) == dict.fromkeys(jobs, 1)
    client.close()


def app_database(app):
    return app.reliable_job.database
