"""Every setting of reliable-job, in one place, and the layers they are read from.

:class:`Settings` is the only list of settings: every source (keyword arguments, a job system's
configuration, ``RELIABLE_JOB_*`` variables, Django's ``RELIABLE_JOB``) is read onto it by
:meth:`Settings.load`, and the relay, completion and staging build themselves from one
:class:`Settings` object. Precedence: code, then the job system's configuration, then the
environment, then the defaults.
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

_OBJECT = "object"
"""Field metadata: the value is a Python object (never parsed from text: not read from the
environment, and an error when a configuration gives it as a string)."""
_LOCATES = "locates_database"
"""Field metadata: the setting says where the outbox database is (a database layer with databases
of its own, like Django's aliases, replaces it)."""


@dataclass(frozen=True)
class Settings:
    """reliable-job's configuration. See the README's configuration table."""

    enable_for_all_jobs: bool = False
    """Stage every task through the outbox unless the task says ``reliable_job=False``."""
    preserve_dead_jobs: bool = False
    """Keep the row of a job that failed for good as ``dead`` (with its error) instead of deleting it."""
    database_url: str = field(default=DEFAULT_DATABASE_URL, metadata={_LOCATES: True})
    """Database the outbox lives in (used by the relay, completion, and staging outside a session)."""
    session: Callable[[], Any] | None = field(
        default=None, compare=False, metadata={_OBJECT: True, _LOCATES: True}
    )
    """Database binding: a callable returning the caller's current session (a ``scoped_session``,
    Flask-SQLAlchemy's ``db.session``...). When it returns a session inside a transaction, staging
    joins that transaction. A Python object: never read from the environment."""
    engine: Any = field(default=None, compare=False, metadata={_OBJECT: True, _LOCATES: True})
    """An existing SQLAlchemy engine for the outbox, instead of ``database_url``. A Python object:
    never read from the environment."""
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
    completion_interval: float = 0.25
    """Seconds a worker process gathers the ids of finished jobs before deleting their rows in one
    statement (sooner when 500 are waiting; on worker shutdown and at exit too). 0 deletes each
    row as its task finishes. A worker killed outright (SIGKILL) leaves the rows it had gathered
    ``sent``: they are published again after ``redeliver_after`` (a duplicate, never a loss)."""
    redeliver_after: float = 3600.0
    """Seconds after which a published job that has not completed (and was not due) is published
    again: it was lost by the broker or by a worker. 0 turns redelivery off."""
    lost_check_after: float = 60.0
    """Seconds after publishing from which the relay checks, every few seconds, that a job not
    completed yet is still somewhere on the broker (queued, held by a worker, or started) and
    publishes it again when it is nowhere: a broker that lost messages (a restart without
    persistence, ``FLUSHALL``, a failover) is noticed within about this time, not after
    ``redeliver_after``. Redis fast path only; 0 turns the check off."""
    metrics_port: int = 0
    """Serve Prometheus metrics on this port from every ``celery worker`` (its main process, next
    to the in-worker relay); 0 (the default) serves none. Needs the ``metrics`` extra
    (``prometheus_client``); docs/operating/metrics.md."""
    metrics_addr: str = "0.0.0.0"  # noqa: S104 - prometheus_client's default: Prometheus scrapes from elsewhere
    """Address the metrics server listens on (``metrics_port``): all interfaces by default, as
    ``prometheus_client``'s ``start_http_server``; ``127.0.0.1`` keeps it local."""
    heartbeat_interval: float = 10.0
    """Seconds between two writes of a relay's row in ``<table>_relays`` (its last pass, published
    count, outage), which ``reliable-job status`` and ``check --max-relay-silence`` read. 0 turns
    the row off."""
    heartbeat_file: str | None = None
    """A file the relay touches every pass and idle tick (at most once a second), for a liveness
    probe that checks its age. Standalone relays and the relay in ``celery worker`` alike."""

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
        if self.lost_check_after < 0:
            raise ConfigurationError("lost_check_after must be 0 (off) or positive")
        if self.max_publish_attempts < 1:
            raise ConfigurationError("max_publish_attempts must be at least 1")
        if self.heartbeat_interval < 0:
            raise ConfigurationError("heartbeat_interval must be 0 (off) or positive")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every setting's name."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def database_location_names(cls) -> tuple[str, ...]:
        """The settings that say where the outbox database is (``database_url``, ``engine``,
        ``session``): a database layer with databases of its own (Django) replaces them."""
        return tuple(f.name for f in fields(cls) if f.metadata.get(_LOCATES))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``RELIABLE_JOB_<NAME>`` variables, then ``overrides``."""
        return cls.load(environ, code=overrides)

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config: Mapping[str, object] | None = None,
        config_key: Callable[[str], str] = lambda name: name,
        code: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Defaults, then ``RELIABLE_JOB_<NAME>`` variables, then ``config`` (a job system's
        configuration, by setting name), then ``code`` (keyword arguments, Django's
        ``RELIABLE_JOB``). ``None`` in ``code`` means "not given".

        Strings in ``config`` are parsed like environment variables; ``config_key(name)`` is the
        key the user wrote, for error messages.
        """
        environ = os.environ if environ is None else environ
        code = dict(code or {})
        config = dict(config or {})
        known = {f.name: f for f in fields(cls)}
        for source, given in (("", code), (" in the configuration", config)):
            unknown = set(given) - set(known)
            if unknown:
                raise ConfigurationError(
                    f"unknown reliable-job setting(s){source}: {', '.join(sorted(unknown))}"
                )
        values: dict[str, Any] = {}
        for name, f in known.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or f.metadata.get(_OBJECT):
                continue
            values[name] = _parse(f, raw, ENV_PREFIX + name.upper())
        for name, value in config.items():
            if isinstance(value, str):
                value = _parse(known[name], value, config_key(name))
            values[name] = value
        values.update({k: v for k, v in code.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(f: dataclasses.Field[Any], raw: str, where: str) -> Any:
    """A setting's value from text (an environment variable, a configuration string)."""
    if f.metadata.get(_OBJECT):
        raise ConfigurationError(f"{where} cannot be given as text: it is a Python object")
    kind = str(f.type)
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
        raise ConfigurationError(f"{where}={raw!r} is not a valid {kind}") from None
    return raw
