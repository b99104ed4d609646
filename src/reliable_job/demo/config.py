"""The demo's configuration: where its database and broker are, and what the worker is told."""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass
from pathlib import Path

from reliable_job.demo.services import DemoError, mask_url

REDELIVER_AFTER = 15
"""Seconds before the demo's relay publishes again a job that never completed (Redis loses the
messages a worker popped but had not yet recorded as unacknowledged when it stops)."""


@dataclass(frozen=True)
class DemoConfig:
    jobs: int
    directory: Path
    database_url: str
    temporary_database: bool
    redis_url: str | None
    run_id: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, directory: Path) -> DemoConfig:
        if args.jobs < 1:
            raise DemoError("--jobs must be at least 1")
        url = args.database_url or f"sqlite:///{directory / 'demo.sqlite3'}"
        return cls(args.jobs, directory, url, args.database_url is None, args.redis_url, uuid.uuid4().hex[:8])

    def _name(self, base: str) -> str:
        # A database of the user's may hold other runs' (or real) tables: this run's own names.
        return base if self.temporary_database else f"{base}_{self.run_id}"

    @property
    def outbox_table(self) -> str:
        return self._name("demo_outbox")

    @property
    def executions_table(self) -> str:
        return self._name("demo_executions")

    @property
    def database_label(self) -> str:
        return "sqlite (temporary file)" if self.temporary_database else mask_url(self.database_url)

    def environment(self, broker_url: str) -> dict[str, str]:
        """The variables that configure :mod:`reliable_job.demo.app`, here and in the worker."""
        return {
            "RJ_DEMO_BROKER_URL": broker_url,
            "RJ_DEMO_QUEUE": f"reliable_job_demo_{self.run_id}",
            "RJ_DEMO_EXECUTIONS": self.executions_table,
            "RELIABLE_JOB_DATABASE_URL": self.database_url,
            "RELIABLE_JOB_TABLE_NAME": self.outbox_table,
            "RELIABLE_JOB_RELAY_IN_WORKER": "1",
            "RELIABLE_JOB_POLL_INTERVAL": "0.05",
            "RELIABLE_JOB_BACKOFF_CAP": "1",
            # Messages Redis loses when it stops (popped by the worker, not yet recorded as
            # unacknowledged) leave their rows `sent`: the relay publishes them again after this.
            "RELIABLE_JOB_REDELIVER_AFTER": str(REDELIVER_AFTER),
        }
