"""End to end: faults around the relay: Redis down while staging and relaying, a corrupt row among
good ones, an outbox database that refuses connections."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.conftest import ROOT, count_rows, outbox_rows, stage_records, wait_for


@pytest.fixture
def own_broker(services, celery_app, redis_server, database_url, table_name):
    """Workers, relays and this process's app all use ``redis_server``, which the test may stop."""
    from reliable_job.integrations.celery import install

    celery_app.conf.broker_url = redis_server.url
    if celery_app._pool is not None:
        celery_app._pool.force_close_all()
        celery_app._pool = None
    runtime = install(celery_app, database_url=database_url, table_name=table_name)
    services.broker_url = redis_server.url
    yield redis_server
    runtime.database.engine.dispose()
    if celery_app._pool is not None:  # connections to a server that is about to go away
        celery_app._pool.force_close_all()
        celery_app._pool = None


def test_redis_outage_keeps_rows_pending_then_delivers_once(services, own_broker, engine, outbox):
    """With Redis down staging still commits, rows stay pending and the relay logs the outage once;
    once Redis is back every committed job runs exactly once and the outbox empties."""
    worker = services.worker()
    before = stage_records(engine, "before", 20)
    wait_for(lambda: set(before) <= {t for t, _, _ in services.executed()}, message="the first jobs to run")
    wait_for(lambda: count_rows(engine, outbox) == 0, message="their rows deleted")

    own_broker.stop()
    during = []
    for round_ in range(3):  # several commits while the broker is down
        during += stage_records(engine, f"during{round_}-", 10)
    wait_for(
        lambda: "relay paused" in services.log(worker), timeout=30, message="the relay to notice the outage"
    )
    time.sleep(2.5)  # let the relay retry several times (backoff cap 1 s) while Redis is down
    assert count_rows(engine, outbox, state="pending") == len(during)
    assert count_rows(engine, outbox) == len(during)
    assert not set(during) & {t for t, _, _ in services.executed()}
    during += stage_records(engine, "late", 10)

    own_broker.start()
    everything = before + during
    wait_for(
        lambda: set(everything) <= {t for t, _, _ in services.executed()},
        timeout=60,
        message="every committed job to run after Redis came back",
    )
    wait_for(lambda: count_rows(engine, outbox) == 0, message="every row deleted")
    runs = Counter(t for t, _, _ in services.executed())
    assert runs == Counter(dict.fromkeys(everything, 1))

    wait_for(lambda: "relay resumed" in services.log(worker), message="the relay to log its recovery")
    log = services.log(worker)
    assert log.count("relay paused") == 1, log
    assert log.count("relay resumed") == 1, log
    assert "relay pass failed" not in log
    services.stop(worker)


def test_corrupt_row_goes_dead_and_the_rest_flow(
    services, celery_app, engine, outbox, database_url, table_name
):
    """A row whose message cannot be published is retried, then set dead with its error after
    max_publish_attempts while the rows around it run; retry-dead puts it back to pending."""
    from tests.apps.celery_app import record

    t = outbox
    with Session(engine) as session:
        good = [record.apply_async((f"good{i}",), reliable_job_session=session).id for i in range(10)]
        bad = record.apply_async(("bad",), reliable_job_session=session).id
        good += [record.apply_async((f"good{i}",), reliable_job_session=session).id for i in range(10, 20)]
        session.execute(update(t).where(t.c.job_id == bad).values(message="not json"))
        session.commit()

    worker = services.worker(RELIABLE_JOB_MAX_PUBLISH_ATTEMPTS="2", RELIABLE_JOB_BACKOFF_CAP="0.2")
    wait_for(lambda: set(good) <= {t for t, _, _ in services.executed()}, message="the good jobs to run")

    def bad_row():
        return next((r for r in outbox_rows(engine, outbox) if r["job_id"] == bad), {})

    wait_for(lambda: bad_row().get("state") == "dead", message="the corrupt row to go dead")
    row = bad_row()
    assert row["attempts"] == 2
    assert "CorruptMessage" in str(row["last_error"])
    wait_for(
        lambda: [r["job_id"] for r in outbox_rows(engine, outbox)] == [bad],
        message="only the corrupt row left",
    )
    assert "bad" not in services.markers()
    assert sorted(services.markers()) == sorted(f"good{i}" for i in range(20))
    assert services.log(worker).count("cannot be published after 2 attempts") == 1
    services.stop(worker)

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "reliable_job.cli",
            "retry-dead",
            "--database-url",
            database_url,
            "--table",
            table_name,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "1 dead job(s) back to pending" in cli.stdout
    row = bad_row()
    assert (row["state"], row["attempts"]) == ("pending", 0)
    assert count_rows(engine, outbox) == 1


def test_relay_waits_out_an_unreachable_database(services, database_url):
    """A relay whose outbox database refuses connections keeps running, logs the outage once, and
    still stops cleanly on SIGTERM."""
    if database_url.startswith("sqlite"):
        unreachable = "sqlite:////nonexistent-reliable-job-dir/outbox.sqlite3"
    else:
        unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/x"
    relay = services.relay(RELIABLE_JOB_DATABASE_URL=unreachable, RELIABLE_JOB_BACKOFF_CAP="0.3")
    wait_for(
        lambda: "relay paused" in services.log(relay) or relay.poll() is not None,
        message="the relay to hit the outage",
    )
    time.sleep(2)  # several retries (backoff cap 0.3 s)
    assert relay.poll() is None, services.log(relay)
    assert services.stop(relay) == 0
    log = services.log(relay)
    assert log.count("relay paused") == 1, log
    assert "DatabaseUnavailable" in log or "outbox database error" in log, log
    assert "relay pass failed" not in log
    assert "relay stopped (0 published)" in log
