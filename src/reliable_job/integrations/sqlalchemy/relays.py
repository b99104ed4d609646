"""The relays' heartbeat table (``<table>_relays``), rendered from :data:`reliable_job.schema.RELAY_COLUMNS`,
and the statements that write and read it (:class:`~reliable_job.heartbeat.RelayRecorder`)."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from sqlalchemy import Column, Engine, MetaData, Table, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from reliable_job import schema
from reliable_job.heartbeat import RelayBeat
from reliable_job.integrations.sqlalchemy.engine import unavailable_as_error
from reliable_job.integrations.sqlalchemy.table import _type

logger = logging.getLogger(__name__)


def relays_table(metadata: MetaData, outbox_name: str = schema.DEFAULT_TABLE_NAME) -> Table:
    """The heartbeat table of outbox ``outbox_name``, attached to ``metadata`` (the one already
    there, if any)."""
    name = schema.relays_table_name(outbox_name)
    if name in metadata.tables:
        return metadata.tables[name]
    columns = []
    for i, col in enumerate(schema.RELAY_COLUMNS):
        default = None
        if col.default is not None:
            default = (
                text(f"'{col.default}'") if isinstance(col.default, str) else text(str(int(col.default)))
            )
        columns.append(
            Column(col.name, _type(col), primary_key=i == 0, nullable=col.nullable, server_default=default)
        )
    return Table(name, metadata, *columns)


def is_missing_table(exc: DBAPIError) -> bool:
    """Whether the statement failed because its table does not exist (PostgreSQL 42P01, SQLite's
    ``no such table``)."""
    return getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in str(exc.orig)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class RelayHeartbeats:
    """The rows of ``<table>_relays`` in one database (a :class:`~reliable_job.heartbeat.RelayRecorder`).

    A database whose heartbeat table was never created (an outbox made before it existed) is said
    once, in one warning, and then left alone: relaying does not depend on it."""

    def __init__(self, engine: Engine, outbox_name: str) -> None:
        self.engine = engine
        self.table = relays_table(MetaData(), outbox_name)
        self._missing = False
        self._lock = threading.Lock()

    def create(self) -> None:
        with unavailable_as_error():
            self.table.create(self.engine, checkfirst=True)

    def record_relay(self, beat: RelayBeat, prune_before: datetime | None) -> None:
        if self._missing:
            return
        values: dict[str, object] = {
            "last_pass_at": beat.last_pass_at,
            "beat_at": beat.beat_at,
            "published": min(beat.published, 2**31 - 1),
            "listening": int(beat.listening),
            "outage_since": beat.outage_since,
        }
        with unavailable_as_error():
            self._write(beat, values, prune_before)

    def _write(self, beat: RelayBeat, values: dict[str, object], prune_before: datetime | None) -> None:
        t = self.table
        try:
            with self.engine.begin() as conn:
                changed = conn.execute(update(t).where(t.c.relay_id == beat.relay_id).values(values)).rowcount
                if not changed:
                    conn.execute(
                        insert(t).values(relay_id=beat.relay_id, started_at=beat.started_at, **values)
                    )
                if prune_before is not None:
                    conn.execute(delete(t).where(t.c.beat_at < prune_before))
        except DBAPIError as exc:
            if is_missing_table(exc):
                self._missing = True
                logger.warning(
                    "relay heartbeats are not recorded: table %s does not exist (create it: "
                    "reliable-job init-db, a new `reliable-job migration`, or manage.py migrate)",
                    t.name,
                )
                return
            raise

    def forget_relay(self, relay_id: str) -> None:
        if self._missing:
            return
        with unavailable_as_error(), self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.relay_id == relay_id))

    def relays(self) -> list[RelayBeat]:
        t = self.table
        query = select(
            t.c.relay_id,
            t.c.started_at,
            t.c.last_pass_at,
            t.c.beat_at,
            t.c.published,
            t.c.listening,
            t.c.outage_since,
        ).order_by(t.c.relay_id)
        with unavailable_as_error():
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(query).all()
            except DBAPIError as exc:
                if is_missing_table(exc):
                    return []
                raise
        return [
            RelayBeat(
                relay_id=row.relay_id,
                started_at=_aware(row.started_at) or datetime.now(timezone.utc),
                last_pass_at=_aware(row.last_pass_at),
                beat_at=_aware(row.beat_at) or datetime.now(timezone.utc),
                published=int(row.published),
                listening=bool(row.listening),
                outage_since=_aware(row.outage_since),
            )
            for row in rows
        ]
