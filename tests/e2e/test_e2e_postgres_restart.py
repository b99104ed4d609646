"""PostgreSQL restarted under two workers with their in-worker relays while jobs are being staged:
every committed job runs, no rolled-back job does, and the outbox ends empty.

A fast shutdown (every session terminated, as a restart or a failover does): the test server runs
with ``synchronous_commit=off``, so an immediate shutdown would also lose commits it had already
acknowledged, which no client can survive. The jobs record their runs in the same database, so
they retry while it is down (a body that fails for good is a delivered job, not a recorded one)."""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tests.conftest import count_rows, need, outbox_rows, wait_for


def pg_ctl(*args: str) -> None:
    """Run the test server's ``pg_ctl`` (as the postgres user when we are root, as initdb was)."""
    services_dir = Path(need("RELIABLE_JOB_SERVICES_DIR"))
    [binary] = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1:]
    # The server's output goes to its log file: a pipe would be held open by the new postmaster.
    argv = [binary, "-D", str(services_dir / "pg" / "data"), "-l", str(services_dir / "pg" / "postgres.log")]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    subprocess.run(
        [*argv, *args],
        check=True,
        cwd=services_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_restart_under_running_relays_and_workers(services, celery_app, engine, outbox):
    from tests.apps.celery_app import record_until_recorded as record

    services.worker(relay=True)
    services.worker(relay=True)
    committed: list[str] = []
    rolled_back: list[str] = []
    unknown: list[str] = []  # the commit raised: it may or may not have happened
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            ids: list[str] = []
            try:
                with Session(engine) as session:
                    ids = [
                        record.apply_async((f"pg{n}-{k}",), reliable_job_session=session).id for k in range(3)
                    ]
                    if n % 4 == 0:
                        session.rollback()
                        rolled_back.extend(ids)
                        continue
                    try:
                        session.commit()
                    except Exception:
                        unknown.extend(ids)
                        raise
                    committed.extend(ids)
            except Exception:
                time.sleep(0.05)  # the database is down: nothing of this transaction is committed
            time.sleep(0.01)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_for(lambda: len(committed) >= 150, timeout=60, message="jobs staged before the restart")
        pg_ctl("-m", "fast", "-w", "stop")
        time.sleep(3)
        pg_ctl("-w", "-t", "60", "restart")  # pg_ctl reuses the server's options (postmaster.opts)
        before = len(committed)
        wait_for(lambda: len(committed) >= before + 150, timeout=90, message="staging after the restart")
    finally:
        stop.set()
        producer.join(30)

    def ran() -> set[str]:
        return {task_id for task_id, _, _ in services.executed()}

    def explain() -> str:
        left = [
            (r["job_id"], r["state"], r["attempts"], r["last_error"]) for r in outbox_rows(engine, outbox)
        ]
        missing = set(committed) - ran()
        return (
            f"{len(missing)} committed jobs never ran, e.g. {sorted(missing)[:3]}; {len(left)} rows left, "
            f"e.g. {left[:5]}; logs: {[services.log(p)[-3000:] for p in services.processes]}"
        )

    try:
        wait_for(lambda: set(committed) <= ran(), timeout=180, interval=0.5, message="every committed job")
        wait_for(
            lambda: count_rows(engine, outbox) == 0, timeout=120, interval=0.5, message="an empty outbox"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {explain()}") from None
    assert not set(rolled_back) & ran(), "a rolled-back job ran"
    assert set(ran()) <= set(committed) | set(unknown), "a job nobody committed ran"
