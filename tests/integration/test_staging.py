"""Staging joins the caller's transaction: in-process, against real SQLite/PostgreSQL and Redis."""

from __future__ import annotations

import json

import pytest
import redis as redis_lib
from sqlalchemy import select, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import reliable_job
from reliable_job import NotSerializableError
from reliable_job.integrations.celery import install
from tests.conftest import count_rows


def rows(engine, outbox):
    with engine.connect() as conn:
        return conn.execute(select(outbox.c.job_id, outbox.c.task_name, outbox.c.state)).all()


def queue_length(redis_url: str) -> int:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return sum(client.llen(key) for key in client.keys("celery*") if client.type(key) == b"list")
    finally:
        client.close()


def test_commit_stages_one_pending_row_with_the_returned_id(celery_app, engine, outbox, redis_url):
    """A reliable task enqueued in a committed transaction is one pending row, not a Redis message."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        result = record.apply_async(("a",), reliable_job_session=session)
        session.commit()
    assert rows(engine, outbox) == [(result.id, "tests.apps.celery_app.record", "pending")]
    assert queue_length(redis_url) == 0


def test_rollback_stages_nothing(celery_app, engine, outbox):
    """A job enqueued in a transaction that rolls back never exists."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        record.apply_async(("a",), reliable_job_session=session)
        assert count_rows(engine, outbox) == 0, "not visible before commit"
        session.rollback()
    assert count_rows(engine, outbox) == 0


def test_savepoint_rolled_back_drops_only_its_jobs(celery_app, engine, outbox):
    """A job staged in a savepoint that rolls back is gone; the outer transaction's job stays."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        kept = record.apply_async(("outer",), reliable_job_session=session)
        with pytest.raises(RuntimeError), session.begin_nested():
            record.apply_async(("inner",), reliable_job_session=session)
            raise RuntimeError("roll back the savepoint")
        released = None
        with session.begin_nested():
            released = record.apply_async(("released",), reliable_job_session=session)
        session.commit()
    assert sorted(r.job_id for r in rows(engine, outbox)) == sorted([kept.id, released.id])


def test_outside_a_transaction_commits_at_once(celery_app, engine, outbox):
    """With no session bound or provided, the job is staged in its own transaction, committed at once."""
    from tests.apps.celery_app import record

    result = record.delay("alone")
    assert [r.job_id for r in rows(engine, outbox)] == [result.id]


def test_bind_block_and_connection(celery_app, engine, outbox):
    """`reliable_job.bind()` stages every job of a block in the bound session or connection."""
    from tests.apps.celery_app import record

    with Session(engine) as session, reliable_job.bind(session):
        record.delay("one")
        record.delay("two")
        session.rollback()
    assert count_rows(engine, outbox) == 0
    with engine.connect() as conn, reliable_job.bind(conn):
        result = record.delay("conn")
        conn.commit()
    assert [r.job_id for r in rows(engine, outbox)] == [result.id]


def test_implicit_session_provider_joins_the_current_transaction(
    celery_app, engine, outbox, database_url, table_name
):
    """The configured session provider is used with nothing passed at the call site."""
    from tests.apps.celery_app import record

    ScopedSession = scoped_session(sessionmaker(engine))
    install(celery_app, engine=engine, table_name=table_name, session=ScopedSession)

    ScopedSession.execute(text("SELECT 1"))  # a transaction is open
    record.delay("rolled back")
    ScopedSession.rollback()
    assert count_rows(engine, outbox) == 0

    ScopedSession.execute(text("SELECT 1"))
    joined = record.delay("joined")
    assert count_rows(engine, outbox) == 0, "waits for the caller's commit"
    ScopedSession.commit()
    assert [r.job_id for r in rows(engine, outbox)] == [joined.id]

    # No transaction open in the provided session: staged at once in its own transaction.
    ScopedSession.remove()
    alone = record.delay("alone")
    assert {r.job_id for r in rows(engine, outbox)} == {joined.id, alone.id}
    ScopedSession.remove()


@pytest.mark.parametrize("enable_for_all", [False, True])
def test_which_tasks_are_staged(
    celery_app, engine, outbox, redis_url, table_name, database_url, enable_for_all
):
    """Opt-in tasks are always staged, opt-out never, others follow enable_for_all_jobs."""
    from tests.apps.celery_app import opt_out_record, plain_record, record

    install(celery_app, database_url=database_url, table_name=table_name, enable_for_all_jobs=enable_for_all)
    with Session(engine) as session, reliable_job.bind(session):
        opt_in = record.delay("in")
        plain = plain_record.delay("plain")
        opt_out = opt_out_record.delay("out")
        session.commit()
    staged = {r.job_id for r in rows(engine, outbox)}
    assert opt_in.id in staged
    assert opt_out.id not in staged
    assert (plain.id in staged) is enable_for_all
    assert queue_length(redis_url) == (1 if enable_for_all else 2)


def test_unserializable_arguments_raise_at_the_call(celery_app, engine, outbox):
    """Arguments the serializer cannot encode raise at the call; nothing staged; the transaction lives."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        with pytest.raises(NotSerializableError, match="cannot be serialized"):
            record.apply_async((object(),), reliable_job_session=session)
        assert isinstance(NotSerializableError("x"), TypeError)
        ok = record.apply_async(("fine",), reliable_job_session=session)
        session.commit()
    assert [r.job_id for r in rows(engine, outbox)] == [ok.id]


def test_same_task_id_twice_is_staged_once(celery_app, engine, outbox):
    """The task id is the row's key: staging it again does not fail the caller's transaction
    (issue 9: it raises DuplicateJobError at the call instead of vanishing silently)."""
    from reliable_job.errors import DuplicateJobError
    from tests.apps.celery_app import record

    with Session(engine) as session:
        record.apply_async(("a",), task_id="same-id", reliable_job_session=session)
        with pytest.raises(DuplicateJobError):
            record.apply_async(("a",), task_id="same-id", reliable_job_session=session)
        session.commit()
    assert [r.job_id for r in rows(engine, outbox)] == ["same-id"]


def redis_snapshot(client) -> dict[bytes, object]:
    """Every key in the test Redis with its content (lists, sets, strings)."""
    snapshot: dict[bytes, object] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"list":
            snapshot[key] = client.lrange(key, 0, -1)
        elif kind == b"set":
            snapshot[key] = client.smembers(key)
        else:
            snapshot[key] = client.get(key)
    return snapshot


def without_delivery_tag(raw: bytes) -> tuple[bytes, str]:
    """The raw message with its delivery tag and its ``expires`` time (``apply_async`` makes it
    from the call's clock) replaced by placeholders."""
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    expires = message["headers"]["expires"]
    return raw.replace(tag.encode(), b"<tag>").replace(expires.encode(), b"<expires>"), tag


@pytest.mark.parametrize("path", ["fast", "kombu", "v1-fast", "v1-kombu"])
@pytest.mark.parametrize("priority", [None, 5])
def test_relay_puts_in_redis_what_a_direct_apply_async_would(
    celery_app, engine, outbox, redis_url, monkeypatch, path, priority
):
    """A relayed message is byte for byte what a direct apply_async puts in Redis (but for its
    fresh delivery tag and the stamp header staging adds, the only other difference allowed):
    same payload, same key (priority queues included), same kombu binding bookkeeping; through
    the Redis fast path and kombu's own path, from a v2 row and from a v1 row staged by
    reliable-job 0.1."""
    from reliable_job.integrations.celery import broker as broker_module
    from reliable_job.integrations.celery.message import CapturedPublish
    from reliable_job.integrations.celery.stamp import HEADER, VALUE
    from tests.apps.celery_app import record

    if path.startswith("v1"):
        monkeypatch.setattr(CapturedPublish, "to_json", CapturedPublish._to_json_v1)
    client = redis_lib.Redis.from_url(redis_url)
    options = dict(
        task_id="same",
        queue="reports",
        priority=priority,
        headers={"tenant": "t1"},
        expires=600,
        link=record.si("after"),
    )
    with Session(engine) as session:
        record.apply_async(("x",), reliable_job_session=session, **options)
        session.commit()
    [message] = [r[0] for r in Session(engine).execute(select(outbox.c.message)).all()]
    assert json.loads(message)["v"] == (1 if path.startswith("v1") else 2)

    relay = celery_app.reliable_job.relay()
    if path.endswith("kombu"):
        relay.broker.fast_path = False
    else:

        def no_kombu(*args, **kwargs):
            raise AssertionError("the fast path handed the message to kombu")

        monkeypatch.setattr(broker_module.KombuBroker, "_publish_kombu", no_kombu)
        monkeypatch.setattr(broker_module.KombuBroker, "_publish_kombu_redis", no_kombu)
    assert relay.run_once() == 1
    relay.broker.close()
    monkeypatch.undo()
    relayed = redis_snapshot(client)
    # kombu's queue bookkeeping, as a direct publish declares it (what Flower and inspect read)
    assert client.smembers("_kombu.binding.reports")
    client.flushdb()

    # the direct publish bypasses reliable-job (its link is reliable: it would be staged)
    monkeypatch.setattr(celery_app, "send_task", celery_app.reliable_job._send_task)
    # on a fresh connection, which declares the queue as a first publish does
    with celery_app.connection_for_write() as conn, conn.Producer() as producer:
        record.apply_async(("x",), producer=producer, **options)
    direct = redis_snapshot(client)
    client.close()

    assert relayed.keys() == direct.keys()
    queue_keys = [k for k, v in direct.items() if isinstance(v, list)]
    expected_key = b"reports" if not priority else b"reports\x06\x163"
    assert queue_keys == [expected_key]
    [relayed_message] = relayed.pop(expected_key)
    [direct_message] = direct.pop(expected_key)
    for snapshot in (relayed, direct):
        snapshot.pop(b"unacked_mutex", None)
    assert relayed == direct
    relayed_bytes, relayed_tag = without_delivery_tag(relayed_message)
    direct_bytes, direct_tag = without_delivery_tag(direct_message)
    # the stamp: the last of the headers, after the caller's own
    stamp = f', "{HEADER}": {json.dumps(VALUE)}}}'.encode()
    assert json.loads(relayed_message)["headers"][HEADER] == VALUE
    assert HEADER not in json.loads(direct_message)["headers"]
    assert relayed_bytes.count(stamp) == 1
    assert relayed_bytes.replace(stamp, b"}") == direct_bytes
    assert relayed_tag and relayed_tag != direct_tag


def test_every_publish_gets_a_fresh_delivery_tag(celery_app, engine, outbox, redis_url):
    """The delivery tag is made at publish time: two messages, or the same row published again
    (redelivery), never share one."""
    from tests.conftest import sql

    client = redis_lib.Redis.from_url(redis_url)
    stage_ids = [f"tag-{i}" for i in range(3)]
    from tests.apps.celery_app import record

    with Session(engine) as session:
        for task_id in stage_ids:
            record.apply_async(("x",), task_id=task_id, reliable_job_session=session)
        session.commit()
    relay = celery_app.reliable_job.relay()
    assert relay.run_once() == 3
    sql(engine, f"UPDATE {outbox.name} SET state = 'pending' WHERE job_id = 'tag-0'")
    assert relay.run_once() == 1
    relay.broker.close()
    messages = [json.loads(m) for m in client.lrange("celery", 0, -1)]
    client.close()
    assert sorted(m["headers"]["id"] for m in messages) == ["tag-0", "tag-0", "tag-1", "tag-2"]
    tags = [m["properties"]["delivery_tag"] for m in messages]
    assert len(set(tags)) == 4


def test_staging_needs_neither_broker_nor_result_backend(engine, outbox, database_url, table_name):
    """With Redis unreachable (broker and result backend), staging still commits the job."""
    from celery import Celery

    dead = "redis://127.0.0.1:1/0"
    app = Celery("offline", broker=dead, backend=dead, set_as_current=False)
    app.conf.redis_socket_connect_timeout = 1
    install(app, database_url=database_url, table_name=table_name)

    @app.task(reliable_job=True, shared=False)
    def offline(x):
        return x

    with Session(engine) as session:
        result = offline.apply_async((1,), countdown=5, reliable_job_session=session)
        session.commit()
    assert [r.job_id for r in rows(engine, outbox)] == [result.id]


def test_a_missing_outbox_table_is_a_clear_staging_error(celery_app, engine, database_url):
    """Staging into a table that was never created raises StagingError naming the fix."""
    from tests.apps.celery_app import record

    install(celery_app, database_url=database_url, table_name="never_created")
    with pytest.raises(reliable_job.StagingError, match=r"never_created.*migration"):
        record.delay("x")
