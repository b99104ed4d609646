"""Relays woken by PostgreSQL LISTEN/NOTIFY, and polling wherever that is off or unavailable."""

from __future__ import annotations

import logging
import threading

import psycopg
import pytest
import redis as redis_lib
from sqlalchemy.orm import Session

from reliable_job.integrations.celery import install
from tests.conftest import sql, wait_for


@pytest.fixture
def pg_app(celery_app, postgres_url, table_name):
    """The test app on PostgreSQL only (the outbox fixture made the table)."""
    return celery_app


def in_redis(redis_url: str) -> int:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return int(client.llen("celery"))
    finally:
        client.close()


def stage_one(engine, marker: str) -> str:
    from tests.apps.celery_app import record

    with Session(engine) as session:
        job_id = record.apply_async((marker,), reliable_job_session=session).id
        session.commit()
    return job_id


def run(relay) -> threading.Thread:
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return thread


def stop(relay, thread: threading.Thread) -> None:
    relay.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "stop() ends the relay's wait"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_commit_wakes_a_relay_with_a_long_poll_interval(
    pg_app, engine, outbox, redis_url, database_url, table_name
):
    """An idle relay polling every 30 s publishes a job staged and committed on PostgreSQL well
    before its next poll: the staging transaction notified it."""
    runtime = install(pg_app, database_url=database_url, table_name=table_name, poll_interval=30)
    relay = runtime.relay()
    thread = run(relay)
    try:
        wait_for(lambda: relay.listening, timeout=10, message="the relay to listen")
        stage_one(engine, "woken")
        wait_for(
            lambda: in_redis(redis_url) == 1, timeout=10, message="the job in Redis long before the 30 s poll"
        )
        assert relay.wakeups >= 1
    finally:
        stop(relay, thread)
    runtime.database.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_staging_notifies_only_committed_transactions(pg_app, engine, outbox, database_url, table_name):
    """The NOTIFY rides on the staging transaction: delivered at its commit, never if it rolls
    back; and at most one per notify_interval from a process."""
    from tests.apps.celery_app import record

    runtime = install(pg_app, database_url=database_url, table_name=table_name, notify_interval=3600)
    url = database_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{table_name}_staged"')
        with Session(engine) as session:
            record.apply_async(("rolled back",), reliable_job_session=session)
            session.rollback()
        assert list(listener.notifies(timeout=0.5)) == []
        runtime.database.stager.notify_throttle.reset()  # a fresh interval
        stage_one(engine, "committed")
        stage_one(engine, "throttled")
        received = list(listener.notifies(timeout=1))
        assert [n.channel for n in received] == [f"{table_name}_staged"]
    runtime.database.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_with_listen_notify_off_the_relay_polls(pg_app, engine, outbox, redis_url, database_url, table_name):
    """listen_notify=False (PgBouncer in transaction mode): no LISTEN, no NOTIFY, and polling
    still delivers."""
    runtime = install(
        pg_app, database_url=database_url, table_name=table_name, listen_notify=False, poll_interval=0.1
    )
    assert not runtime.database.stager.notify_due()
    relay = runtime.relay()
    thread = run(relay)
    try:
        stage_one(engine, "polled")
        wait_for(lambda: in_redis(redis_url) == 1, timeout=30, message="the job in Redis")
        assert not relay.listening
        assert relay.wakeups == 0
    finally:
        stop(relay, thread)
    runtime.database.engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_lost_listening_connection_falls_back_to_polling(
    pg_app, engine, outbox, redis_url, database_url, table_name, caplog
):
    """When LISTEN cannot be set up, or its connection is killed, the relay logs it, keeps
    delivering by polling, and listens again later."""
    runtime = install(pg_app, database_url=database_url, table_name=table_name, poll_interval=0.1)
    real_listener = runtime.database.listener
    calls = []

    def listener():
        calls.append(1)
        if len(calls) == 1:
            raise psycopg.OperationalError("LISTEN refused (simulated)")
        return real_listener()

    runtime.database.listener = listener
    relay = runtime.relay()
    relay.listen_retry = 0.2
    with caplog.at_level(logging.WARNING, logger="reliable_job.relay"):
        thread = run(relay)
        try:
            stage_one(engine, "first")
            wait_for(lambda: in_redis(redis_url) == 1, timeout=30, message="the first job")
            wait_for(lambda: relay.listening, timeout=30, message="the relay to listen")
            killed = sql(
                engine,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE query LIKE 'LISTEN \"{table_name}_staged\"%'",
            )
            assert killed == [(True,)]
            wait_for(
                lambda: any("stopped listening" in r.getMessage() for r in caplog.records),
                timeout=30,
                message="the relay to notice",
            )
            stage_one(engine, "second")
            wait_for(lambda: in_redis(redis_url) == 2, timeout=30, message="the second job")
            wait_for(
                lambda: len(calls) >= 3 and relay.listening, timeout=30, message="the relay to listen again"
            )
        finally:
            stop(relay, thread)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot listen" in m for m in messages) == 1, messages
    runtime.database.engine.dispose()
