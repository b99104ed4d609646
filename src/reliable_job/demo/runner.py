"""``reliable-job demo``: stage jobs in transactions while the broker goes down, and check that
every committed job ran and no rolled-back job did."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import Table, func, select

from reliable_job.demo.config import REDELIVER_AFTER, DemoConfig
from reliable_job.demo.outage import Console, Outage
from reliable_job.demo.services import Broker, DemoError, EmbeddedRedis, ExternalRedis, Worker, mask_url
from reliable_job.demo.workload import Ledger, stage_transaction, transactions
from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 180.0
OUTAGE_SECONDS = 4.0
PROGRESS_INTERVAL = 1.0
POLL_INTERVAL = 0.1
MAX_WORKER_RESTARTS = 3
STALL_SECONDS = 30.0


@dataclass(frozen=True)
class Snapshot:
    """What the database says at one moment."""

    executed: int
    pending: int
    sent: int
    dead: int

    @property
    def outbox(self) -> int:
        return self.pending + self.sent + self.dead


class Demo:
    def __init__(
        self,
        config: DemoConfig,
        console: Console,
        broker: Broker,
        worker: Worker,
        database: SQLAlchemyDatabase,
        executions: Table,
        task: Any,
    ) -> None:
        self.config = config
        self.console = console
        self.worker = worker
        self.database = database
        self.executions = executions
        self.task = task
        self.ledger = Ledger()
        self.outage = Outage(broker, max(1, config.jobs // 3), OUTAGE_SECONDS, console)
        self._next_progress = 0.0
        self.restarts = 0

    def run(self) -> bool:
        """Stage every job, then wait for the drain; True when the outbox drained."""
        try:
            for orders, rollback in transactions(self.config.jobs):
                ids = stage_transaction(self.database.engine, self.task, orders, rollback)
                self.ledger.record(ids, rollback)
                self._tick()
            self.console.say(
                f"staging done: {len(self.ledger.committed)} committed, "
                f"{len(self.ledger.rolled_back)} rolled back; waiting for the drain"
            )
            return self._wait_for_drain()
        finally:
            self.outage.cancel()

    def _wait_for_drain(self) -> bool:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        last, changed_at = None, time.monotonic()
        while True:
            snapshot = self._tick()
            if snapshot != last:
                last, changed_at = snapshot, time.monotonic()
            if not self.outage.active and snapshot.outbox == 0:
                self.console.say(f"drained: {snapshot.executed} jobs executed, the outbox is empty")
                return True
            if self._stalled(snapshot, time.monotonic() - changed_at):
                self.console.say(
                    f"no progress for {STALL_SECONDS:.0f}s and only `sent` rows left, although the "
                    f"relay publishes them again {REDELIVER_AFTER}s after they were sent"
                )
                return False
            if time.monotonic() > deadline:
                self.console.say(f"gave up after {DRAIN_TIMEOUT:.0f}s: {self._progress(snapshot)}")
                return False
            time.sleep(POLL_INTERVAL)

    def _stalled(self, snapshot: Snapshot, still_for: float) -> bool:
        """Only `sent` rows left, and nothing moved for longer than a redelivery (the visibility
        timeout) and a worker reconnect take."""
        only_sent = snapshot.sent > 0 and snapshot.pending == 0
        return not self.outage.active and only_sent and still_for > STALL_SECONDS

    def _tick(self) -> Snapshot:
        if self.worker.exit_status is not None:
            self._restart_worker()
        self.outage.tick(self.ledger.staged)
        snapshot = self.snapshot()
        if time.monotonic() >= self._next_progress:
            self.console.say(self._progress(snapshot))
            self._next_progress = time.monotonic() + PROGRESS_INTERVAL
        return snapshot

    def _restart_worker(self) -> None:
        """Start the worker again when it exits, as a process supervisor would.

        Celery 5.7 / kombu 5.7 workers sometimes exit ("Unrecoverable error: AttributeError:
        'NoneType' object has no attribute 'hostname'") when the Redis connection drops while they
        hold unacknowledged messages. Those are redelivered after the visibility timeout; a message
        popped from the queue but not yet recorded as unacknowledged is lost with the process.
        """
        status = self.worker.exit_status
        if self.worker.runs > MAX_WORKER_RESTARTS:
            raise DemoError(
                f"the celery worker exited (status {status}) {self.worker.runs} times:\n"
                + self.worker.log_tail()
            )
        reason = self.worker.last_error()
        self.worker.restart()
        self.restarts += 1
        self.console.say(
            f"celery worker exited with status {status} ({reason[:160]}); "
            f"started it again (pid {self.worker.pid})"
        )

    def _progress(self, s: Snapshot) -> str:
        ledger = self.ledger
        redis = "DOWN" if self.outage.active else "up"
        return (
            f"staged {ledger.staged}/{self.config.jobs}  committed {len(ledger.committed)}  "
            f"rolled back {len(ledger.rolled_back)}  executed {s.executed}  "
            f"outbox pending {s.pending} sent {s.sent}"
            + (f" dead {s.dead}" if s.dead else "")
            + f"  redis {redis}"
        )

    def snapshot(self) -> Snapshot:
        status = self.database.status()
        with self.database.engine.connect() as conn:
            executed = conn.execute(select(func.count(func.distinct(self.executions.c.task_id)))).scalar()
        return Snapshot(int(executed or 0), status.pending, status.sent, status.dead)

    def describe_leftovers(self, limit: int = 5) -> str:
        """The first rows still in the outbox: job id, state, publish attempts, last error."""
        t = self.database.table
        stmt = select(t.c.job_id, t.c.state, t.c.attempts, t.c.last_error).order_by(t.c.id).limit(limit)
        with self.database.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return "\n".join(
            f"  {r.job_id} {r.state}, {r.attempts} publish attempt(s), last error: {r.last_error or '-'}"
            for r in rows
        )

    def runs_per_task(self) -> Counter[str]:
        t = self.executions
        with self.database.engine.connect() as conn:
            rows = conn.execute(select(t.c.task_id, func.count()).group_by(t.c.task_id)).all()
        return Counter({str(task_id): int(count) for task_id, count in rows})

    def report(self, broker: Broker) -> dict[str, Any]:
        runs = self.runs_per_task()
        snapshot = self.snapshot()
        ledger = self.ledger
        return {
            "jobs": self.config.jobs,
            "committed": len(ledger.committed),
            "rolled_back": len(ledger.rolled_back),
            "transactions_committed": ledger.transactions_committed,
            "transactions_rolled_back": ledger.transactions_rolled_back,
            "executed": len(ledger.committed & runs.keys()),
            "executed_rolled_back": len(ledger.rolled_back & runs.keys()),
            "executed_unknown": len(runs.keys() - ledger.committed - ledger.rolled_back),
            "duplicates": sum(count - 1 for count in runs.values()),
            "outbox_left": snapshot.outbox,
            "outbox_left_by_state": {
                "pending": snapshot.pending,
                "sent": snapshot.sent,
                "dead": snapshot.dead,
            },
            "redis_outage_seconds": round(self.outage.seconds, 1) if self.outage.started_at else 0,
            "database": self.config.database_label,
            "broker": broker.description,
            "worker_restarts": self.restarts,
        }


def succeeded(report: dict[str, Any]) -> bool:
    return bool(
        report["executed"] == report["committed"]
        and report["executed_rolled_back"] == 0
        and report["outbox_left"] == 0
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo end to end; print the report as the last line of stdout; 0 when it held."""
    console = Console(time.monotonic())
    with tempfile.TemporaryDirectory(prefix="reliable-job-demo-") as directory:
        config = DemoConfig.from_args(args, Path(directory))
        with ExitStack() as cleanup:
            report = _run(config, console, cleanup)
    report["seconds"] = round(console.elapsed(), 1)
    ok = succeeded(report)
    console.say(
        "OK: every committed job ran, no rolled-back job did, the outbox is empty"
        if ok
        else "FAILED: see the report"
    )
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


def _run(config: DemoConfig, console: Console, cleanup: ExitStack) -> dict[str, Any]:
    broker = _broker(config)
    broker.start()
    cleanup.callback(broker.stop)
    env = config.environment(broker.url)
    os.environ.update(env)
    app = _demo_app()
    database: SQLAlchemyDatabase = app.runtime.database
    cleanup.callback(database.engine.dispose)
    _create_tables(config, database, app.executions, cleanup)
    console.say(
        f"database {config.database_label}, outbox table {database.table.name}; "
        f"broker {broker.description} at {mask_url(broker.url)}"
    )
    worker = Worker(config.directory, dict(os.environ), name=f"demo-{config.run_id}")
    cleanup.callback(worker.stop)
    worker.wait_ready()
    console.say(
        f"celery worker ready (pid {worker.pid}, concurrency 2, relay inside the worker); "
        f"staging {config.jobs} jobs"
    )
    if not broker.restartable:
        console.say("external Redis: no outage phase (the demo only stops a server it started)")
    demo = Demo(config, console, broker, worker, database, app.executions, app.process_order)
    drained = demo.run()
    worker.stop()
    if not drained:
        console.say("rows left in the outbox:\n" + demo.describe_leftovers())
        console.say("worker log (last lines):\n" + demo.worker.log_tail())
    return demo.report(broker)


def _broker(config: DemoConfig) -> Broker:
    if config.redis_url:
        return ExternalRedis(config.redis_url)
    return EmbeddedRedis(config.directory / "redis")


def _demo_app() -> ModuleType:
    """Import the demo's Celery app, configured by the environment just set."""
    name = "reliable_job.demo.app"
    module = sys.modules.get(name)
    return importlib.reload(module) if module is not None else importlib.import_module(name)


def _create_tables(
    config: DemoConfig, database: SQLAlchemyDatabase, executions: Table, cleanup: ExitStack
) -> None:
    database.create_table()
    executions.metadata.create_all(database.engine)
    if not config.temporary_database:
        cleanup.callback(_drop_tables, database, executions)


def _drop_tables(database: SQLAlchemyDatabase, executions: Table) -> None:
    executions.metadata.drop_all(database.engine)
    database.table.metadata.drop_all(database.engine, tables=[database.table])
