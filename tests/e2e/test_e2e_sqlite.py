"""End to end on SQLite as the README sets it up: a plain ``create_engine`` handed to ``install``,
two ``celery worker`` processes each with its in-worker relay.

The relay and completion never depend on how the application's engine was set up (the store opens
its own connections to the same file), the relay holds SQLite's write lock only briefly (a claim
lease, not the broker round trip), and the application's own read-then-write transactions on the
recommended engine (``create_outbox_engine(url, immediate=True)``) never fail with
``database is locked`` while relays and completion write.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis as redis_lib
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import scoped_session, sessionmaker

from reliable_job.errors import StagingError
from reliable_job.integrations.sqlalchemy import create_outbox_engine
from tests.conftest import count_rows, install_test_app, stage_records, wait_for

PLAIN = {
    "RJ_TEST_PLAIN_ENGINE": "1"
}  # the workers' app: install(app, engine=create_engine(url), session=...)


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: a file like the README's ``shop.db``."""
    return f"sqlite:///{tmp_path / 'shop.db'}"


def readme_engine(url: str) -> Engine:
    return create_engine(url)


def immediate_engine(url: str) -> Engine:
    return create_outbox_engine(url, immediate=True)


def install_in_test_process(app_engine: Engine, table_name: str, redis_url: str):
    """The test Celery app in this process, installed as the README does: ``engine=`` the
    application's engine, ``session=`` a ``scoped_session`` on it."""
    from tests.apps import celery_app as module

    session = scoped_session(sessionmaker(app_engine))
    _, runtime = install_test_app(None, table_name, redis_url, engine=app_engine, session=session)
    return module, session, runtime


@pytest.fixture
def shop(request, database_url, table_name, redis_url, outbox) -> Iterator[tuple[object, scoped_session]]:
    """``(tests.apps.celery_app, Session)`` installed on the application engine the test asks for
    (``readme_engine`` unless parametrized)."""
    make: Callable[[str], Engine] = getattr(request, "param", readme_engine)
    app_engine = make(database_url)
    module, session, runtime = install_in_test_process(app_engine, table_name, redis_url)
    yield module, session
    session.remove()
    runtime.database.close()
    runtime.database.engine.dispose()
    app_engine.dispose()


def wait_until_done(services, engine, outbox, ids: list[str]) -> Counter[str]:
    wait_for(
        lambda: set(services.runs()) >= set(ids),
        timeout=180,
        interval=0.5,
        message=f"all {len(ids)} jobs to run",
    )
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=90, interval=0.2, message="the outbox to empty")
    return services.runs()


def test_readme_setup_two_workers_run_every_job_exactly_once(services, shop, engine, outbox):
    """The README's quickstart set-up (a plain ``create_engine``), two workers each relaying: 2,000
    jobs staged in the application's transactions each run exactly once and the outbox ends empty
    (before the store opened its own engine, the plain engine's claims took no write lock and both
    relays published most rows)."""
    module, session = shop
    workers = [services.worker(**PLAIN) for _ in range(2)]
    total, per_transaction = 2000, 20
    ids: list[str] = []
    for start in range(0, total, per_transaction):
        with session.begin():
            session.execute(text("SELECT 1"))
            ids += [module.record.delay(f"r{start + i}").id for i in range(per_transaction)]
    runs = wait_until_done(services, engine, outbox, ids)
    twice = sum(1 for n in runs.values() if n > 1)
    assert runs == Counter(dict.fromkeys(ids, 1)), f"{twice} of {total} jobs ran more than once"
    for worker in workers:
        services.stop(worker)
        assert "database is locked" not in services.log(worker)


@pytest.mark.parametrize("shop", [immediate_engine, readme_engine], indirect=True)
def test_app_read_then_write_transactions_never_fail_while_workers_relay(services, shop, engine, outbox):
    """The application's own transactions that read, then write (and stage a job) run in two
    threads while two workers relay and complete: none fails with ``database is locked``, on the
    recommended engine (``create_outbox_engine(url, immediate=True)``) nor on the README's plain one.

    (On ``create_outbox_engine(url)`` alone, a deferred ``BEGIN``, SQLite refuses to upgrade a read
    snapshot another writer moved past, whatever the busy timeout.)"""
    module, session = shop
    session.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
    session.commit()
    session.remove()
    workers = [services.worker(**PLAIN) for _ in range(2)]
    per_thread = 250
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def orders() -> None:
        try:
            for _ in range(per_thread):
                try:
                    with session.begin():
                        n = session.execute(text("SELECT COUNT(*) FROM orders")).scalar_one()
                        session.execute(text("INSERT INTO orders (n) VALUES (:n)"), {"n": n})
                        job_id = module.record.delay(f"o{n}").id
                except (OperationalError, StagingError) as exc:
                    with lock:
                        errors.append(str(exc).splitlines()[0])
                    continue
                with lock:
                    ids.append(job_id)
        finally:
            session.remove()

    threads = [threading.Thread(target=orders) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [], f"{len(errors)} failed transactions, e.g. {errors[:3]}"
    assert len(ids) == 2 * per_thread
    runs = wait_until_done(services, engine, outbox, ids)
    assert runs == Counter(dict.fromkeys(ids, 1))
    for worker in workers:
        services.stop(worker)


def queued_ids(redis_url: str) -> list[str]:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return [json.loads(raw)["headers"]["id"] for raw in client.lrange("celery", 0, -1)]
    finally:
        client.close()


def test_a_relay_killed_between_its_two_transactions_loses_nothing(
    services, celery_app, engine, outbox, redis_url
):
    """A relay SIGKILLed after publishing its batch, before its claim's second transaction: its
    rows stay pending under the lease (another relay takes the rest, never them), then are
    published again once the lease is over: nothing lost, one batch twice."""
    total, batch = 100, 40
    ids = stage_records(engine, "l", total)
    dying = services._start(
        "lease-relay",
        [sys.executable, "-m", "tests.apps.lease_relay"],
        RELIABLE_JOB_BATCH_SIZE=str(batch),
        RJ_TEST_LEASE_SECONDS="3",
    )
    dying.wait_for_line(rf"published {batch}", timeout=60)
    dying.kill()
    assert dying.wait(timeout=10) == -signal.SIGKILL
    leased = set(queued_ids(redis_url))
    assert len(leased) == batch
    assert count_rows(engine, outbox, state="pending") == total

    relay = celery_app.reliable_job.relay()
    try:
        assert relay.run_once() == total - batch, "the rows not leased"
        assert relay.run_once() == 0, "the leased rows are not taken while the lease holds"
        assert set(queued_ids(redis_url)) == set(ids)
        wait_for(relay.run_once, timeout=60, interval=0.2, message="the lease to end")
    finally:
        relay.broker.close()
    assert count_rows(engine, outbox, state="sent") == total
    queued = Counter(queued_ids(redis_url))
    assert set(queued) == set(ids), "a committed job never reached the broker"
    assert {job for job, n in queued.items() if n > 1} == leased, "only the dead relay's batch twice"
    assert sum(queued.values()) == total + batch
