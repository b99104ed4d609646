"""A worker SIGKILLed in the middle of its work (its relay thread and its pool with it)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy.orm import Session

from tests.conftest import count_rows, wait_for


def pool_children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the worker's prefork pool)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def test_a_killed_worker_loses_no_committed_job(services, celery_app, engine, outbox):
    """SIGKILL of a worker that relays and runs jobs: the jobs it held are published again
    (redeliver_after) and every committed job runs; none is lost."""
    from tests.apps.celery_app import slow_record

    total = 300
    with Session(engine) as session:
        ids = [slow_record.apply_async((f"job{i}",), reliable_job_session=session).id for i in range(total)]
        session.commit()
    env = {"RELIABLE_JOB_REDELIVER_AFTER": "3", "RELIABLE_JOB_BATCH_SIZE": "50"}
    worker = services.worker(**env)
    wait_for(lambda: len(services.markers()) >= 40, timeout=60, message="work under way")
    for pid in [*pool_children(worker.pid), worker.pid]:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    ran_before = len(set(services.markers()))
    assert ran_before < total, "the worker was killed in the middle of its work"

    replacement = services.worker(**env)
    wait_for(
        lambda: count_rows(engine, outbox) == 0, timeout=180, message="every job completed after the crash"
    )
    executed = {task_id for task_id, _, _ in services.executed()}
    assert executed == set(ids)
    services.stop(replacement)
