"""The demo's Celery app: one reliable task that records each run in the executions table.

``reliable-job demo`` runs this module in a real ``celery worker`` and imports it in its own
process to stage jobs. It is configured from the environment the demo sets:

``RJ_DEMO_BROKER_URL``
    the Redis broker;
``RJ_DEMO_QUEUE``
    the queue of this run (a fresh one per run, so a shared Redis never mixes runs);
``RJ_DEMO_EXECUTIONS``
    the table the task records its runs in (``demo_executions``);
``RJ_DEMO_READY_FILE``
    a file the worker creates once it consumes;
``RELIABLE_JOB_*``
    reliable-job's own settings (database URL, outbox table, relay timings).
"""

from __future__ import annotations

import functools
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from sqlalchemy import Column, DateTime, Engine, Integer, MetaData, String, Table, insert

from reliable_job.integrations.celery import install
from reliable_job.integrations.sqlalchemy import create_outbox_engine

BROKER_ENV = "RJ_DEMO_BROKER_URL"
QUEUE_ENV = "RJ_DEMO_QUEUE"
EXECUTIONS_ENV = "RJ_DEMO_EXECUTIONS"
READY_FILE_ENV = "RJ_DEMO_READY_FILE"

app = Celery("reliable_job_demo", broker=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
        # A message the worker had reserved when the broker went down stays unacknowledged in
        # Redis; it is redelivered after the visibility timeout (an hour by default): seconds here.
        "visibility_timeout": 10,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
    },
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get(QUEUE_ENV, "reliable_job_demo"),
    task_ignore_result=True,
)
runtime = install(app)

executions = Table(
    os.environ.get(EXECUTIONS_ENV, "demo_executions"),
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("task_id", String(255), nullable=False, index=True),
    Column("order_number", Integer, nullable=False),
    Column("executed_at", DateTime(timezone=True), nullable=False),
)


@functools.cache
def _engine() -> Engine:
    # Created on first use, in the pool process that runs the task.
    return create_outbox_engine(runtime.settings.database_url)


def _process_order(self: Any, order_number: int) -> int:
    """The demo's job: record that it ran (task id and order number)."""
    with _engine().begin() as conn:
        conn.execute(
            insert(executions).values(
                task_id=self.request.id,
                order_number=order_number,
                executed_at=datetime.now(timezone.utc),
            )
        )
    return order_number


process_order = app.task(_process_order, bind=True, reliable_job=True, name="reliable_job.demo.process_order")


def _signal_ready(**_: Any) -> None:
    path = os.environ.get(READY_FILE_ENV)
    if path:
        Path(path).touch()


worker_ready.connect(_signal_ready, weak=False)
