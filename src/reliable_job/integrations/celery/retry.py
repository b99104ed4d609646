"""Celery retries: a job published again under its own id moves its row's due time.

``Task.retry(countdown=...)`` republishes the running job's message, same task id, straight to the
broker (the job already has its row: it is not staged again). The retry then waits in a worker
until its eta, while the row still says the job was published at the first attempt's time.
Without a new due time, redelivery (``redeliver_after``) would see a job published long ago that
never completed and publish the original message again while the retry still waits.

So before the retry is published, the row's ``eta`` becomes the retry's (UTC) and its ``sent_at``
now (:meth:`~reliable_job.ports.OutboxStore.postpone`, one short transaction): redelivery waits
for the retry's eta plus ``redeliver_after``. Done before the publish, so no redelivery pass can
slip in between. If the update fails the retry is published all the same (logged): redelivery
stays the backstop, at worst one extra run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone

from reliable_job.ports import OutboxStore, as_utc

logger = logging.getLogger(__name__)


def parse_eta(value: object) -> datetime | None:
    """An eta as Celery takes or writes it (a datetime, or an ISO 8601 string, with or without an
    offset) as aware UTC; naive means UTC, as Celery's worker reads it. ``None`` when absent or
    unreadable."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    return as_utc(value) if isinstance(value, datetime) else None


def retry_due(options: Mapping[str, object], now: datetime | None = None) -> datetime:
    """When the republished job runs, from its ``send_task`` options (UTC): ``countdown`` wins over
    ``eta`` (as in Celery's message preparation); neither, or unreadable: now."""
    now = now or datetime.now(timezone.utc)
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool) and countdown:
        return now + timedelta(seconds=float(countdown))
    return parse_eta(options.get("eta")) or now


def postpone_retry(
    store: OutboxStore,
    task_id: str,
    options: Mapping[str, object],
    clock: Callable[[], datetime] | None = None,
) -> None:
    """Move ``task_id``'s row to the retry's due time; never raises (see the module's docstring)."""
    due = retry_due(options, clock() if clock is not None else None)
    try:
        store.postpone(task_id, due)
    except Exception:
        logger.warning(
            "could not move the due time of retried job %s to %s; publishing the retry anyway "
            "(redelivery may publish the job again meanwhile)",
            task_id,
            due.isoformat(),
            exc_info=True,
            extra={"reliable_job.job_id": task_id},
        )
