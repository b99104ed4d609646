"""SQLite: which engine the store uses, the claim lease between two relays, and immediate
transactions for the application's own engine."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis as redis_lib
from sqlalchemy import create_engine, event, make_url, text

from reliable_job import Settings
from reliable_job.errors import ConfigurationError
from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase, create_outbox_engine, sqlite_immediate
from reliable_job.integrations.sqlalchemy.engine import has_outbox_setup, sqlite_file_url
from tests.conftest import stage_records, wait_for


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


def begins(engine) -> list[str]:
    """The BEGIN statements ``engine`` sends from now on."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, *args):
        if statement.startswith("BEGIN"):
            seen.append(statement)

    return seen


def test_a_plain_application_engine_gets_a_store_engine_of_its_own(tmp_path, monkeypatch, table_name):
    """A plain ``create_engine`` (relative path, as the README's ``sqlite:///shop.db``): the store
    opens its own engine, with the outbox set-up, on the same file as an absolute path."""
    monkeypatch.chdir(tmp_path)
    app_engine = create_engine("sqlite:///shop.db")
    db = SQLAlchemyDatabase(Settings(engine=app_engine, table_name=table_name))
    try:
        assert db.engine is not app_engine
        assert has_outbox_setup(db.engine) and not has_outbox_setup(app_engine)
        assert db.engine.url.database == str(tmp_path / "shop.db")
        seen = begins(db.engine)
        db.create_table()
        with db.claim(10) as claim:
            assert list(claim.rows) == []
        assert "BEGIN IMMEDIATE" in seen
        with app_engine.connect() as conn:
            assert conn.execute(text(f"SELECT COUNT(*) FROM {table_name}")).scalar() == 0
    finally:
        db.engine.dispose()
        app_engine.dispose()


def test_an_engine_with_the_outbox_setup_is_used_as_it_is(database_url, table_name):
    for app_engine in (
        create_outbox_engine(database_url),
        create_outbox_engine(database_url, immediate=True),
    ):
        db = SQLAlchemyDatabase(Settings(engine=app_engine, table_name=table_name))
        assert db.engine is app_engine
        app_engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_is_refused_in_one_line(url):
    for settings in (Settings(engine=create_engine(url)), Settings(database_url=url)):
        with pytest.raises(ConfigurationError, match="in-memory SQLite") as info:
            SQLAlchemyDatabase(settings)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigurationError, match="in-memory SQLite"):
        sqlite_file_url(make_url("sqlite:///file:mem?mode=memory&uri=true"))


def test_immediate_engines_begin_every_transaction_immediate(database_url):
    """``create_outbox_engine(url, immediate=True)`` and ``sqlite_immediate(engine)``: every
    transaction opens with ``BEGIN IMMEDIATE``; without them, a plain ``BEGIN``."""
    deferred = create_outbox_engine(database_url)
    immediate = create_outbox_engine(database_url, immediate=True)
    existing = create_engine(database_url)
    with existing.connect() as conn:  # used once before: its pooled connection is replaced
        conn.execute(text("SELECT 1"))
    assert sqlite_immediate(existing) is existing
    assert sqlite_immediate(existing) is existing  # twice: no second listener
    try:
        for engine, expected in (
            (deferred, "BEGIN"),
            (immediate, "BEGIN IMMEDIATE"),
            (existing, "BEGIN IMMEDIATE"),
        ):
            seen = begins(engine)
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
            assert seen == [expected], engine
        assert has_outbox_setup(existing)
        with existing.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        for engine in (deferred, immediate, existing):
            engine.dispose()


def test_two_relays_on_one_sqlite_file_never_publish_the_same_row(celery_app, engine, outbox, redis_url):
    """Two relays in one process, each with its own store on the same SQLite file, drain one
    backlog concurrently (each publishing while the other claims): every row is published once."""
    total, batch = 2000, 50
    ids = stage_records(engine, "p", total)
    runtime = celery_app.reliable_job
    settings = runtime.settings.replace(batch_size=batch, poll_interval=0.01)
    relays = []
    for _ in range(2):
        store = SQLAlchemyDatabase(settings)
        relay = runtime.relay(store=store)
        relay.batch_size = batch
        publish = relay.broker.publish

        def slow_publish(rows, publish=publish):
            time.sleep(0.02)  # a broker round trip long enough for the other relay to claim
            return publish(rows)

        relay.broker.publish = slow_publish
        relays.append((relay, store))
    threads = [threading.Thread(target=relay.run) for relay, _ in relays]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: relays[0][1].status().sent == total, timeout=120, message="every row sent")
    finally:
        for relay, _ in relays:
            relay.stop()
        for thread in threads:
            thread.join(timeout=30)
        for _, store in relays:
            store.engine.dispose()
    published = [relay.published for relay, _ in relays]
    assert sum(published) == total and all(published), published

    client = redis_lib.Redis.from_url(redis_url)
    try:
        assert client.llen("celery") == total
        queued = Counter(json.loads(raw)["headers"]["id"] for raw in client.lrange("celery", 0, -1))
    finally:
        client.close()
    assert queued == Counter(dict.fromkeys(ids, 1))
