# Changing the schema: tables already exist in users' databases, created by migrations that are
# frozen (the Django migrations in integrations/django/migrations/, the Alembic revisions
# `reliable-job migration` wrote). An edit of COLUMNS or INDEXES therefore ships with a new Django
# migration and the matching Alembic revision; `makemigrations --check` in
# tests/django/test_django_schema.py fails until the Django one exists. See DEVELOPERS.md.
"""The outbox table, described once.

The SQLAlchemy ``Table``, the CLI's DDL, new Alembic revisions and the Django model are rendered
from :data:`COLUMNS` and :data:`INDEXES`; the Django migrations are frozen snapshots of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from reliable_job.errors import ConfigurationError

DEFAULT_TABLE_NAME = "reliable_job_outbox"

PENDING = "pending"
"""Staged and committed, not yet on the broker."""
SENT = "sent"
"""On the broker, waiting for the worker to complete it."""
DEAD = "dead"
"""Set aside: could not be published, or failed for good with ``preserve_dead_jobs`` on."""
STATES = (PENDING, SENT, DEAD)

ColumnKind = Literal["id", "string", "text", "integer", "timestamp"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    nullable: bool = False
    length: int | None = None
    unique: bool = False
    default: str | int | None = None
    doc: str = ""

    def unique_name(self, table_name: str) -> str:
        """Name of the unique constraint on this column (``unique=True``)."""
        return f"uq_{table_name}_{self.name}"


@dataclass(frozen=True)
class Index:
    suffix: str
    columns: tuple[str, ...]
    where_pending: bool = False
    """Partial index restricted to ``state = 'pending'``: claiming stays flat as history grows."""

    def name(self, table_name: str) -> str:
        return f"ix_{table_name}_{self.suffix}"


COLUMNS: tuple[Column, ...] = (
    Column("id", "id", doc="Surrogate key; claim order."),
    Column("job_id", "string", length=255, unique=True, doc="The job's id (Celery task id)."),
    Column("task_name", "string", length=255, doc="Registered task name."),
    Column("queue", "string", length=255, doc="Queue (or routing key) the job is published to."),
    Column("message", "text", doc="The finished broker message, JSON (never pickle)."),
    Column("state", "string", length=16, default=PENDING, doc="pending / sent / dead."),
    Column("attempts", "integer", default=0, doc="Publish attempts made so far."),
    Column("last_error", "text", nullable=True, doc="Last publish or task error."),
    Column("available_at", "timestamp", nullable=True, doc="Earliest next publish attempt."),
    Column("created_at", "timestamp", doc="When the job was staged."),
    Column("eta", "timestamp", nullable=True, doc="When the job is due (countdown/eta), if set."),
    Column("sent_at", "timestamp", nullable=True, doc="When the relay last claimed it to publish."),
    Column("updated_at", "timestamp", doc="Last state change."),
)

INDEXES: tuple[Index, ...] = (
    Index("pending", ("id",), where_pending=True),
    Index("state", ("state", "sent_at")),
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")


def validate_table_name(name: str) -> str:
    """Return ``name`` if it is a plain SQL identifier, else raise :class:`ConfigurationError`."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigurationError(
            f"invalid table name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 51 characters"
        )
    return name


def notify_channel(table_name: str) -> str:
    """The PostgreSQL ``LISTEN``/``NOTIFY`` channel that wakes the relays of ``table_name``."""
    return f"{validate_table_name(table_name)}_staged"


# -- the relays' heartbeats: one small table beside the outbox -------------------------------------
#
# Each relay writes its row at most every ``heartbeat_interval`` seconds (reliable_job.heartbeat);
# ``reliable-job status`` reads them. The first column is the primary key. Like COLUMNS, an edit
# here ships with a new Django migration and the matching Alembic revision.

RELAYS_SUFFIX = "_relays"

RELAY_COLUMNS: tuple[Column, ...] = (
    Column("relay_id", "string", length=255, doc="host:pid:random, one per relay (primary key)."),
    Column("started_at", "timestamp", doc="When the relay started."),
    Column("last_pass_at", "timestamp", nullable=True, doc="End of its last successful pass."),
    Column("beat_at", "timestamp", doc="When the relay last wrote this row."),
    Column("published", "integer", default=0, doc="Jobs it published since it started."),
    Column("listening", "integer", default=0, doc="1 while it listens for wake-ups, else 0."),
    Column("outage_since", "timestamp", nullable=True, doc="Broker or database unreachable since."),
)

RELAY_PRUNE_AFTER = 86400.0
"""Seconds after which the row of a relay that stopped writing (killed, host gone) is deleted."""


def relays_table_name(table_name: str) -> str:
    """The heartbeat table of outbox ``table_name``: ``<table_name>_relays``."""
    return validate_table_name(table_name) + RELAYS_SUFFIX
