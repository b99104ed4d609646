"""The outbox's health, read cheaply: counts, oldest pending and sent ages, the relays' heartbeats;
and what a database error says about the configuration (a wrong password is not an outage).

``status()`` must stay cheap on a large outbox (a probe runs it every few seconds): every query
walks an index (``ix_<t>_pending`` for pending rows and the oldest one, ``ix_<t>_state`` for the
others and the oldest sent one), and on PostgreSQL a state the planner estimates at more than
:data:`ESTIMATE_ABOVE` rows is given as that estimate (``estimated: true``, from the statistics
``ANALYZE`` keeps, in well under a millisecond) instead of being counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import Connection, Engine, Table, func, literal, select
from sqlalchemy.exc import DBAPIError

from reliable_job import schema
from reliable_job.errors import DatabaseMisconfigured, DatabaseUnavailable
from reliable_job.heartbeat import RelayBeat
from reliable_job.integrations.sqlalchemy.engine import unavailable_as_error
from reliable_job.integrations.sqlalchemy.relays import is_missing_table
from reliable_job.ports import OutboxStatus

ESTIMATE_ABOVE = 50_000
"""On PostgreSQL, a state with more rows than this is counted by the planner's estimate."""


def read_status(engine: Engine, table: Table, relays: list[RelayBeat]) -> OutboxStatus:
    """The outbox's :class:`~reliable_job.ports.OutboxStatus`, in one connection."""
    t = table
    postgres = engine.dialect.name == "postgresql"
    counts: dict[str, int] = {}
    estimated = False
    with classified_errors(table), engine.connect() as conn:
        if postgres:
            for state in schema.STATES:
                counts[state], guessed = _bounded_count(conn, t, state)
                estimated = estimated or guessed
        else:
            counts = dict(conn.execute(select(t.c.state, func.count()).group_by(t.c.state)).all())
        oldest_pending = conn.execute(
            select(t.c.created_at).where(t.c.state == schema.PENDING).order_by(t.c.id).limit(1)
        ).scalar()
        oldest_sent = conn.execute(
            select(t.c.sent_at)
            .where(t.c.state == schema.SENT, t.c.sent_at.is_not(None))
            .order_by(t.c.sent_at)
            .limit(1)
        ).scalar()
    now = datetime.now(timezone.utc)
    return OutboxStatus(
        pending=counts.get(schema.PENDING, 0),
        sent=counts.get(schema.SENT, 0),
        dead=counts.get(schema.DEAD, 0),
        oldest_pending_seconds=_age(oldest_pending, now),
        oldest_sent_seconds=_age(oldest_sent, now),
        relays=tuple(relay.as_dict(now) for relay in relays),
        estimated=estimated,
    )


def _bounded_count(conn: Connection, t: Table, state: str) -> tuple[int, bool]:
    """Rows in ``state``: the planner's estimate when it is above :data:`ESTIMATE_ABOVE`
    (``True``), else an exact count (an index-only walk of at most about that many entries)."""
    query = select(literal(1)).where(t.c.state == state)
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}").scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    guess = int(plan[0]["Plan"]["Plan Rows"])
    if guess > ESTIMATE_ABOVE:
        return guess, True
    return int(conn.execute(select(func.count()).where(t.c.state == state)).scalar_one()), False


def _age(value: datetime | None, now: datetime) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return max(0.0, (now - value).total_seconds())


# -- a permanently wrong configuration, told apart from an outage ------------------------------------

_SQLSTATES = {
    "28P01": "authentication refused",
    "28000": "authentication refused",
    "3D000": "unknown database",
    "42P01": "outbox table missing",
}
_MESSAGES = (
    ("password authentication failed", "authentication refused"),
    ("authentication failed", "authentication refused"),
    ("no password supplied", "authentication refused"),
    ("no pg_hba.conf entry", "authentication refused"),
    ("does not exist", "unknown database"),  # database "x" / role "x" does not exist
    ("no such table", "outbox table missing"),
)
"""A SQLite file that cannot be opened (its directory missing: a volume not mounted yet) is an
outage, waited out; SQLite creates a missing file, whose missing table is then reported."""


def misconfiguration(exc: BaseException) -> str | None:
    """What a database error says is wrong for good (``authentication refused``, ``unknown
    database``, ``outbox table missing``), or ``None`` when it may be an outage."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    state = getattr(orig, "sqlstate", None)
    if state in _SQLSTATES:
        return _SQLSTATES[state]
    text = str(orig).lower()
    if "does not exist" in text and "role" in text:
        return "authentication refused"
    for needle, kind in _MESSAGES:
        if needle in text:
            return kind
    return None


def probe(engine: Engine, table: Table) -> None:
    """Read the outbox table once. Raises :class:`~reliable_job.errors.DatabaseMisconfigured`
    (one line: which, and the server's words, never the URL) when the configuration is wrong for
    good, :class:`~reliable_job.errors.DatabaseUnavailable` when the database is only unreachable."""
    with classified_errors(table), engine.connect() as conn:
        conn.execute(select(table.c.id).limit(1)).all()


@contextmanager
def classified_errors(table: Table) -> Iterator[None]:
    """Database errors as :class:`~reliable_job.errors.DatabaseMisconfigured` when the
    configuration is wrong for good (:func:`misconfiguration`), else as ``unavailable_as_error``
    has them (``DatabaseUnavailable`` for an outage)."""
    try:
        yield
    except (DBAPIError, DatabaseUnavailable) as exc:
        error = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
        kind = misconfiguration(error) if isinstance(error, DBAPIError) else None
        if kind is None or not isinstance(error, DBAPIError):
            with unavailable_as_error():
                raise
        if is_missing_table(error):
            detail = f"table {table.name} does not exist (create it: reliable-job init-db or migrations)"
        else:
            detail = " ".join(str(error.orig).split())
        raise DatabaseMisconfigured(f"{kind}: {detail}") from error
