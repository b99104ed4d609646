"""Completion: what happens to a job's row once the worker is done with it."""

from __future__ import annotations

import logging

from reliable_job.ports import OutboxStore

logger = logging.getLogger(__name__)


class Completion:
    """Deletes the row of a job that succeeded; deletes or buries one that failed for good.

    Errors are logged, never raised: a failed delete must not fail the task.
    """

    def __init__(self, store: OutboxStore, *, preserve_dead_jobs: bool = False) -> None:
        self.store = store
        self.preserve_dead_jobs = preserve_dead_jobs

    def succeeded(self, job_id: str) -> None:
        try:
            self.store.complete(job_id)
        except Exception:
            logger.exception(
                "could not delete the outbox row of job %s", job_id,
                extra={"reliable_job.job_id": job_id},
            )

    def failed(self, job_id: str, error: str) -> None:
        try:
            if self.preserve_dead_jobs:
                self.store.bury(job_id, error)
            else:
                self.store.complete(job_id)
        except Exception:
            logger.exception(
                "could not finish the outbox row of failed job %s", job_id,
                extra={"reliable_job.job_id": job_id},
            )
