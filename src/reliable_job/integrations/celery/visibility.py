"""What ``celery inspect`` (and Flower, which reads it) shows of reliable-job in a worker.

- ``celery inspect stats``: the relay bootstep's :meth:`~.worker.RelayStep.info` adds a
  ``reliable_job`` key (:func:`relay_stats`): jobs published, listening or polling, the outage in
  progress, the last pass, how many relays. Celery builds ``stats`` from every bootstep's
  ``info(worker)`` (``WorkController.stats`` -> ``Blueprint.info``), so the figures come from the
  relay thread's own counters: no database or broker round trip.
- ``celery inspect reliable_job_status``: the remote-control command below, the outbox's status
  (pending, sent and dead rows, oldest ages) read from the database by the worker that answers.

Importing this module registers the command (Celery's ``inspect_command``: a process-wide
registry). ``install(app)`` imports it, so does ``celery worker``; the ``celery inspect`` client
must have imported it too, as it checks command names against the same registry.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery.worker.control import inspect_command

from reliable_job.errors import ReliableJobError

if TYPE_CHECKING:
    from reliable_job.relay import Relay, RelayGroup

logger = logging.getLogger(__name__)

STATS_KEY = "reliable_job"
"""The key of ``celery inspect stats`` that holds the relay's figures."""

LISTENING = "listening"
POLLING = "polling"


def relay_stats(relay: Relay | RelayGroup | None) -> dict[str, object]:
    """The relay's figures for ``celery inspect stats`` (JSON values only).

    - ``published``: rows published since the worker started;
    - ``mode``: ``"listening"`` when every relay waits on PostgreSQL ``LISTEN`` right now,
      ``"polling"`` otherwise (SQLite, ``listen_notify`` off, or listening failed and is retried);
    - ``outage_since``: ISO 8601 UTC time the current outage began (database or broker
      unreachable), the earliest of the relays', or ``None``;
    - ``last_pass``: ISO 8601 UTC time of the last pass that reached the database and the broker
      (with several relays, the least recent: the one an alert should see), or ``None`` before
      the first;
    - ``relays``: how many relays this worker runs (one per outbox database).
    """
    relays = _relays(relay)
    outages = [r.outage_since for r in relays if r.outage_since is not None]
    passes = [r.last_pass_at for r in relays if r.last_pass_at is not None]
    last_pass = min(passes) if relays and len(passes) == len(relays) else None
    return {
        "published": sum(r.published for r in relays),
        "mode": LISTENING if relays and all(r.listening for r in relays) else POLLING,
        "outage_since": _iso(min(outages)) if outages else None,
        "last_pass": _iso(last_pass),
        "relays": len(relays),
    }


def _relays(relay: Relay | RelayGroup | None) -> list[Relay]:
    if relay is None:
        return []
    members: list[Relay] | None = getattr(relay, "relays", None)  # a RelayGroup
    return list(members) if members is not None else [relay]  # type: ignore[list-item]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


@inspect_command()  # type: ignore[untyped-decorator]
def reliable_job_status(state: Any, **_: Any) -> dict[str, object]:
    """The outbox status: pending, sent and dead rows, oldest ages (reliable-job)."""
    runtime = getattr(state.app, "reliable_job", None)
    if runtime is None:
        return {"error": "reliable-job is not installed on this worker's Celery app"}
    try:
        status = runtime.database.status()
    except ReliableJobError as exc:  # DatabaseUnavailable: its message names no credentials
        return {"error": str(exc)}
    except Exception as exc:
        logger.warning("reliable_job_status: could not read the outbox status", exc_info=True)
        return {"error": f"could not read the outbox status: {type(exc).__name__}"}
    figures: dict[str, object] = status.health_dict()
    return figures
