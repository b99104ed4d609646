"""Every setting of reliable-job, in one place, from code and from ``RELIABLE_JOB_*`` variables.

Values given in code win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.schema import DEFAULT_TABLE_NAME, validate_table_name

ENV_PREFIX = "RELIABLE_JOB_"
DEFAULT_DATABASE_URL = "sqlite:///reliable_job.sqlite3"


@dataclass(frozen=True)
class Settings:
    """reliable-job's configuration. See the README's configuration table."""

    enable_for_all_jobs: bool = False
    """Stage every task through the outbox unless the task says ``reliable_job=False``."""
    preserve_dead_jobs: bool = False
    """Keep the row of a job that failed for good as ``dead`` (with its error) instead of deleting it."""
    database_url: str = DEFAULT_DATABASE_URL
    """Database the outbox lives in (used by the relay, completion, and staging outside a session)."""
    session: Callable[[], Any] | None = field(default=None, compare=False)
    """Database binding: a callable returning the caller's current session (a ``scoped_session``,
    Flask-SQLAlchemy's ``db.session``...). When it returns a session inside a transaction, staging
    joins that transaction. Code only."""
    engine: Any = field(default=None, compare=False)
    """An existing SQLAlchemy engine for the outbox, instead of ``database_url``. Code only."""
    table_name: str = DEFAULT_TABLE_NAME
    batch_size: int = 500
    """Rows the relay claims and publishes per transaction."""
    poll_interval: float = 0.2
    """Seconds the relay waits between polls when the outbox is empty."""
    listen_notify: bool = True
    """On PostgreSQL, staging wakes idle relays with ``NOTIFY`` (at most one per process every
    ``notify_interval`` seconds) and relays ``LISTEN``; polling stays the fallback. Turn it off
    where ``LISTEN`` cannot work, e.g. behind PgBouncer in transaction pooling mode."""
    notify_interval: float = 0.002
    """Shortest time, in seconds, between two ``NOTIFY`` from one process. A relay keeps polling
    quickly (``hot_poll``) for a second after a wake-up or a busy pass, so the jobs staged in
    between are not left waiting; fewer NOTIFY means less contention at commit."""
    hot_poll: float = 0.005
    """Seconds a relay waits between polls for a second after a wake-up or a pass that found
    rows (``poll_interval`` applies once it is idle)."""
    relay_in_worker: bool = True
    """Run a relay thread inside every ``celery worker`` process."""
    backoff_cap: float = 30.0
    """Longest wait, in seconds, between retries while the broker or database is down."""
    max_publish_attempts: int = 5
    """Publish attempts before a row that cannot be published is set ``dead``; also the most
    deliveries of a job that never completes (see ``redeliver_after``)."""
    completion_interval: float = 0.05
    """Seconds a worker process gathers the ids of finished jobs before deleting their rows in one
    statement (sooner when 500 are waiting; on worker shutdown and at exit too). 0 deletes each
    row as its task finishes. A worker killed outright (SIGKILL) leaves the rows it had gathered
    ``sent``: they are published again after ``redeliver_after`` (a duplicate, never a loss)."""
    redeliver_after: float = 3600.0
    """Seconds after which a published job that has not completed (and was not due) is published
    again: it was lost by the broker or by a worker. 0 turns redelivery off."""

    def __post_init__(self) -> None:
        validate_table_name(self.table_name)
        if self.batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        if self.poll_interval <= 0 or self.backoff_cap <= 0 or self.hot_poll <= 0:
            raise ConfigurationError("poll_interval, hot_poll and backoff_cap must be positive")
        if self.notify_interval < 0:
            raise ConfigurationError("notify_interval must be 0 or positive")
        if self.completion_interval < 0:
            raise ConfigurationError("completion_interval must be 0 (off) or positive")
        if self.redeliver_after < 0:
            raise ConfigurationError("redeliver_after must be 0 (off) or positive")
        if self.max_publish_attempts < 1:
            raise ConfigurationError("max_publish_attempts must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``RELIABLE_JOB_<NAME>`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise ConfigurationError(f"unknown reliable-job setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or name in ("session", "engine"):
                continue
            values[name] = _parse(name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
