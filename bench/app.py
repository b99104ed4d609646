"""The Celery app every benchmark process uses: the harness itself, ``reliable-job relay --app
bench.app:app`` subprocesses and ``celery -A bench.app worker``.

Configured from the environment the harness sets: ``BENCH_BROKER_URL`` (a dedicated Redis database)
and the library's own ``RELIABLE_JOB_*`` variables (database URL, table name, relay in worker).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from reliable_job.integrations.celery import install

QUEUE = "bench"
"""Every benchmark task goes to this queue; on Redis it is the list of the same name."""
COUNTER = "bench:done"
"""Redis key the no-op tasks increment: the end-to-end figure waits for it to reach N."""

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/5"))
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
runtime = install(app)

_counter: Any = None


def _count() -> None:
    global _counter
    if _counter is None:  # one client per (forked) worker process
        _counter = redis.Redis.from_url(app.conf.broker_url)
    _counter.incr(COUNTER)


@app.task(name="bench.reliable_noop", reliable_job=True)
def reliable_noop(*args: Any) -> None:
    """Staged in the outbox; counts its execution."""
    _count()


@app.task(name="bench.plain_noop", reliable_job=False)
def plain_noop(*args: Any) -> None:
    """Published directly, the usual Celery way; counts its execution."""
    _count()
