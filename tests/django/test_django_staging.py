"""Staging on Django's connections, in-process (no worker): a reliable task enqueued inside
``transaction.atomic()`` joins that transaction (savepoints included) on PostgreSQL and SQLite;
outside one it commits at once; ``delay_on_commit`` stages in the transaction; per-task and
per-call database aliases. Visibility is checked from a separate connection (the relay's)."""

from __future__ import annotations

import pytest
import redis as redis_lib
from django.db import connections, transaction

from reliable_job.errors import ConfigurationError
from tests.django.conftest import ALL_DATABASES, flush_redis, outbox

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)


@pytest.fixture
def runtime():
    from proj.celery import app

    flush_redis()
    return app.reliable_job


def committed(runtime, alias: str) -> int:
    """Pending rows another connection (the relay's) sees in ``alias``'s outbox."""
    return runtime.database.status(alias).pending


@pytest.fixture(params=["default", "sqlite"])
def alias_task(request, runtime):
    """A reliable task staged on PostgreSQL (default) or on SQLite, and its alias."""
    from tests.django.testapp.tasks import record, record_sqlite

    alias = request.param
    committed(runtime, alias)  # connect the relay's engine first (SQLite: WAL set up)
    return alias, record if alias == "default" else record_sqlite


def test_the_celery_app_of_the_django_layout_is_installed(runtime):
    """INSTALLED_APPS is enough: proj.celery's app (Celery's Django layout) got the Django runtime,
    with the RELIABLE_JOB settings."""
    from reliable_job.integrations.celery import CeleryIntegration
    from reliable_job.integrations.django.database import DjangoOutbox

    assert isinstance(runtime, CeleryIntegration) and isinstance(runtime.database, DjangoOutbox)
    assert runtime.settings.poll_interval == 0.05
    assert sorted(runtime.database.aliases()) == ["default", "other", "sqlite"]


def test_atomic_commit_stages_in_the_transaction(runtime, alias_task):
    """Inside atomic() the row exists only in the transaction; the commit makes it visible."""
    alias, task = alias_task
    with transaction.atomic(using=alias):
        result = task.delay("committed")
        assert [job_id for _, _, job_id in outbox(alias)] == [result.id]  # same connection
        assert committed(runtime, alias) == 0  # another connection: not yet
    assert committed(runtime, alias) == 1
    assert outbox(alias) == [(task.name, "pending", result.id)]


def test_rollback_discards_the_job(runtime, alias_task):
    alias, task = alias_task
    with pytest.raises(RuntimeError), transaction.atomic(using=alias):
        task.delay("rolled back")
        raise RuntimeError("boom")
    assert outbox(alias) == []
    assert committed(runtime, alias) == 0


def test_nested_atomic_inner_rollback_discards_only_its_jobs(runtime, alias_task):
    """A nested atomic() is a savepoint: rolling it back drops the jobs staged in it; the outer
    transaction's jobs are kept and committed."""
    alias, task = alias_task
    with transaction.atomic(using=alias):
        outer = task.delay("outer")
        with pytest.raises(RuntimeError), transaction.atomic(using=alias):
            task.delay("inner")
            raise RuntimeError("inner fails")
        with transaction.atomic(using=alias):
            released = task.delay("released savepoint")
    assert [job_id for _, _, job_id in outbox(alias)] == [outer.id, released.id]
    assert committed(runtime, alias) == 2


def test_outside_atomic_the_job_commits_at_once(runtime, alias_task):
    """Autocommit (a view without atomic()): the row is committed by the insert itself."""
    alias, task = alias_task
    result = task.delay("autocommit")
    assert committed(runtime, alias) == 1
    assert outbox(alias) == [(task.name, "pending", result.id)]


def test_delay_on_commit_of_a_reliable_task_is_staged_in_the_transaction(runtime):
    """delay_on_commit / apply_async_on_commit stage the job now (no on_commit callback), so it
    is rolled back with the transaction, or committed with it."""
    from tests.django.testapp.tasks import record

    with pytest.raises(RuntimeError), transaction.atomic():
        record.delay_on_commit("doc rolled back")
        record.apply_async_on_commit(("doc rolled back",))
        assert len(outbox()) == 2
        assert connections["default"].run_on_commit == []
        raise RuntimeError("boom")
    assert outbox() == []
    with transaction.atomic():
        record.delay_on_commit("doc")
        assert connections["default"].run_on_commit == []
        assert committed(runtime, "default") == 0
    assert committed(runtime, "default") == 1


def test_delay_on_commit_of_a_plain_task_keeps_celerys_behaviour(runtime):
    """A task that is not reliable: delay_on_commit registers an on_commit callback that
    publishes straight to the broker after the commit; nothing is staged."""
    import os

    from tests.django.testapp.tasks import plain_record

    client = redis_lib.Redis.from_url(os.environ["RELIABLE_JOB_TEST_REDIS_URL"])
    with transaction.atomic():
        plain_record.delay_on_commit("plain")
        assert len(connections["default"].run_on_commit) == 1
        assert client.llen("celery") == 0
    assert outbox() == []
    assert client.llen("celery") == 1
    client.close()


def test_per_task_and_per_call_database_alias(runtime):
    """reliable_job_database="other" on the task stages in the other database's transaction;
    reliable_job_session="other" does it for one call of any reliable task."""
    from tests.django.testapp.tasks import record, record_other

    committed(runtime, "other")
    with transaction.atomic(using="other"):
        by_task = record_other.delay("by task")
        by_call = record.apply_async(("by call",), reliable_job_session="other")
        assert committed(runtime, "other") == 0
    with pytest.raises(RuntimeError), transaction.atomic(using="other"):
        record_other.delay("rolled back")
        raise RuntimeError("boom")
    assert [job_id for _, _, job_id in outbox("other")] == [by_task.id, by_call.id]
    assert outbox("default") == []
    assert committed(runtime, "other") == 2


def test_settings_are_checked():
    from reliable_job.integrations.django import conf

    settings, options = conf.read({"database": "other", "batch_size": 7, "databases": ["x"]})
    assert (settings.batch_size, options.database, options.databases) == (7, "other", ("x",))
    with pytest.raises(ConfigurationError, match="unknown"):
        conf.read({"bacth_size": 7})
    with pytest.raises(ConfigurationError, match="database_url"):
        conf.read({"database_url": "sqlite://"})
    with pytest.raises(ConfigurationError, match="batch_size"):
        conf.read({"batch_size": 0})


def test_engine_url_is_built_from_databases():
    """The relay's engine connects to the same databases as Django's connections."""
    from django.conf import settings

    from reliable_job.integrations.django.database import engine_url

    entry = settings.DATABASES["default"]
    url = engine_url("default")
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        entry["HOST"],
        int(entry["PORT"]),
        entry["NAME"],
    )
    assert engine_url("sqlite").database == str(settings.DATABASES["sqlite"]["NAME"])
    with pytest.raises(ConfigurationError, match="alias"):
        engine_url("nope")


def test_bind_a_block_to_an_alias(runtime):
    """reliable_job.bind("other") stages every reliable job of the block in that alias."""
    import reliable_job
    from tests.django.testapp.tasks import record

    with transaction.atomic(using="other"), reliable_job.bind("other"):
        bound = record.delay("bound")
    assert [job_id for _, _, job_id in outbox("other")] == [bound.id]
    assert outbox("default") == []


def test_same_task_id_is_staged_once(runtime, alias_task):
    """Like the SQLAlchemy writer: ON CONFLICT DO NOTHING on the job id (issue 9: the second
    call raises DuplicateJobError, the transaction commits)."""
    from reliable_job.errors import DuplicateJobError

    alias, task = alias_task
    with transaction.atomic(using=alias):
        task.apply_async(("first",), task_id="same-id")
        with pytest.raises(DuplicateJobError):
            task.apply_async(("second",), task_id="same-id")
    assert outbox(alias) == [(task.name, "pending", "same-id")]


def test_a_missing_table_is_a_staging_error(runtime):
    """Without the table (no migrate) the call fails with a StagingError that says so."""
    from django.db import connection

    from reliable_job.errors import StagingError
    from tests.django.testapp.tasks import record

    with pytest.raises(RuntimeError), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE reliable_job_outbox RENAME TO reliable_job_outbox_gone")
        with pytest.raises(StagingError, match=r"manage\.py migrate"):
            record.delay("no table")
        raise RuntimeError("roll the rename back")
    assert outbox() == []


def test_staging_on_postgresql_wakes_the_relays_at_commit(runtime):
    """On PostgreSQL the Django writer sends the relays' NOTIFY in the staging transaction: it
    arrives when the transaction commits, never for a rollback; the relay of that alias listens."""
    import psycopg

    from reliable_job.integrations.django.database import engine_url
    from reliable_job.schema import notify_channel
    from tests.django.testapp.tasks import record

    url = engine_url("default").set(drivername="postgresql").render_as_string(hide_password=False)
    channel = notify_channel(runtime.settings.table_name)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel}"')
        runtime.database.stager.notify_throttle.reset()  # a fresh throttle interval
        with pytest.raises(RuntimeError), transaction.atomic():
            record.delay("rolled back")
            raise RuntimeError("boom")
        assert list(listener.notifies(timeout=0.5)) == []
        runtime.database.stager.notify_throttle.reset()
        with transaction.atomic():
            record.delay("committed")
            assert list(listener.notifies(timeout=0.3)) == []  # not before the commit
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [channel]
    relay = runtime.relay(runtime.database.store("default"))
    assert relay.listens  # LISTEN on the alias's own store, not on the DjangoOutbox
