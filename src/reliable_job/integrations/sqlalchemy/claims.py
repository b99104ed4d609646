"""The relay's claims, named for how they take their rows: by ``SELECT`` and a lease (SQLite: two
short transactions, the broker round trip between them) or by ``UPDATE ... RETURNING`` (PostgreSQL,
``SKIP LOCKED``, one transaction)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, Update

from reliable_job.integrations.sqlalchemy.statements import CLAIM_PLAN, OutboxStatements, utcnow
from reliable_job.ports import ClaimedRow

logger = logging.getLogger(__name__)


LEASE_SECONDS = 30.0
"""How long a claim by SELECT (SQLite) holds its rows between its two transactions.

Long enough for any publish (one broker round trip per batch); a relay that dies, or stalls longer
than this, between its two transactions leaves its rows pending, and they are claimed and
published again once the lease is over (the duplicates after a crash, at most one batch)."""


class ClaimBySelect:
    """Rows read by ``SELECT`` and leased (SQLite, others): two short transactions, so the relay
    never holds SQLite's one write lock across the broker round trip.

    The first (``BEGIN IMMEDIATE``: one claim at a time) reads up to ``limit`` due rows and pushes
    their ``available_at`` to ``lease_until``, so no other claim takes them, and commits. The relay
    publishes and reports; the reports are kept here and written by the second transaction when the
    claim ends (:meth:`finish`), only to rows whose lease is still this claim's. Rows the relay did
    not report are due again at once; a claim that ends with an exception writes no report and
    releases every row (as a rollback would: the next pass publishes them again)."""

    def __init__(
        self, statements: OutboxStatements, rows: Sequence[ClaimedRow], lease_until: datetime
    ) -> None:
        self._sql = statements
        self.rows: Sequence[ClaimedRow] = rows
        self.lease_until = lease_until
        self._sent: list[int] = []
        self._reports: list[tuple[Update, dict[str, object]]] = []
        self._settled: set[int] = set()

    def mark_sent(self, ids: Sequence[int]) -> None:
        self._sent.extend(ids)
        self._settled.update(ids)

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        now = utcnow()
        params: dict[str, object] = {
            "row_id": row.id,
            "new_attempts": row.attempts + 1,
            "error": error,
            "now": now,
        }
        if retry_in is None:
            self._reports.append((self._sql.leased_mark_dead, params))
        else:
            params["retry_at"] = now + timedelta(seconds=retry_in)
            self._reports.append((self._sql.leased_mark_retry, params))
        self._settled.add(row.id)

    def defer(self, row: ClaimedRow, retry_in: float) -> None:
        now = utcnow()
        params = {
            "row_id": row.id,
            "new_attempts": row.attempts,
            "retry_at": now + timedelta(seconds=retry_in),
            "now": now,
        }
        self._reports.append((self._sql.leased_defer, params))
        self._settled.add(row.id)

    def finish(self, conn: Connection) -> None:
        """The second transaction's work: the reports, then the unreported rows released."""
        lease = {"lease_until": self.lease_until}
        if self._sent:
            conn.execute(self._sql.leased_mark_sent, {"ids": self._sent, "now": utcnow(), **lease})
        for statement, params in self._reports:
            conn.execute(statement, {**params, **lease})
        self.release(conn, [row.id for row in self.rows if row.id not in self._settled])

    def release(self, conn: Connection, ids: Sequence[int] | None = None) -> None:
        """Rows still leased by this claim (``ids``, or all) due again at once."""
        ids = [row.id for row in self.rows] if ids is None else list(ids)
        if ids:
            conn.execute(self._sql.leased_release, {"ids": ids, "lease_until": self.lease_until})


class ClaimByUpdate:
    """Rows locked and marked sent by one ``UPDATE ... RETURNING`` (PostgreSQL), in the claim's
    transaction, so a pass is claim -> publish -> COMMIT. Rows the relay reports failed or
    deferred, or does not report, are put back to pending (or dead) before the COMMIT; a crash or
    an outage rolls everything back, exactly as with a claim by ``SELECT``.

    ``rows`` carry their ``attempts`` as before the claim."""

    def __init__(self, conn: Connection, statements: OutboxStatements, rows: Sequence[ClaimedRow]) -> None:
        self._conn = conn
        self._sql = statements
        self.rows: Sequence[ClaimedRow] = rows
        self._settled: set[int] = set()

    def mark_sent(self, ids: Sequence[int]) -> None:
        self._settled.update(ids)  # the claim marked them already

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        _mark_failed(self._conn, self._sql, row, error, retry_in)
        self._settled.add(row.id)

    def defer(self, row: ClaimedRow, retry_in: float) -> None:
        _defer(self._conn, self._sql, row, retry_in)
        self._settled.add(row.id)

    def finish(self) -> None:
        unsettled = [row for row in self.rows if row.id not in self._settled]
        if unsettled:
            self._conn.execute(
                self._sql.release,
                [{"row_id": row.id, "new_attempts": row.attempts} for row in unsettled],
            )


def _mark_failed(
    conn: Connection, sql: OutboxStatements, row: ClaimedRow, error: str, retry_in: float | None
) -> None:
    now = utcnow()
    params = {"row_id": row.id, "new_attempts": row.attempts + 1, "error": error, "now": now}
    if retry_in is None:
        conn.execute(sql.mark_dead, params)
    else:
        conn.execute(sql.mark_retry, {**params, "retry_at": now + timedelta(seconds=retry_in)})


def _defer(conn: Connection, sql: OutboxStatements, row: ClaimedRow, retry_in: float) -> None:
    now = utcnow()
    conn.execute(
        sql.defer,
        {
            "row_id": row.id,
            "new_attempts": row.attempts,
            "retry_at": now + timedelta(seconds=retry_in),
            "now": now,
        },
    )


def _by_id(row: ClaimedRow) -> int:
    return row.id


@contextmanager
def claim(
    engine: Engine, statements: OutboxStatements, limit: int
) -> Iterator[ClaimBySelect | ClaimByUpdate]:
    """Claim up to ``limit`` publishable rows through ``engine`` (its claim engine: ``BEGIN
    IMMEDIATE`` on SQLite): on PostgreSQL in one transaction committed when the block ends; elsewhere
    by lease (:class:`ClaimBySelect`), its reports written when the block ends."""
    if engine.dialect.name != "postgresql":
        with _lease(engine, statements, limit) as leased:
            yield leased
        return
    params = {"now": utcnow(), "limit": limit}
    with engine.begin() as conn:
        conn.exec_driver_sql(CLAIM_PLAN)
        rows = sorted(
            (
                ClaimedRow(row_id, job_id, message, attempts - 1)
                for row_id, job_id, message, attempts in conn.execute(statements.claim_by_update, params)
            ),
            key=_by_id,
        )
        taken = ClaimByUpdate(conn, statements, rows)
        yield taken
        taken.finish()


@contextmanager
def _lease(engine: Engine, statements: OutboxStatements, limit: int) -> Iterator[ClaimBySelect]:
    now = utcnow()
    lease_until = now + timedelta(seconds=LEASE_SECONDS)
    with engine.begin() as conn:  # BEGIN IMMEDIATE: one claim at a time, short
        rows = [
            ClaimedRow(*r) for r in conn.execute(statements.claim_by_select, {"now": now, "limit": limit})
        ]
        if rows:
            conn.execute(statements.lease, {"ids": [row.id for row in rows], "lease_until": lease_until})
    taken = ClaimBySelect(statements, rows, lease_until)
    if not rows:
        yield taken
        return
    try:
        yield taken
    except BaseException:
        try:
            with engine.begin() as conn:
                taken.release(conn)
        except Exception:
            logger.debug(
                "could not release claimed rows; they are due again when their lease ends", exc_info=True
            )
        raise
    with engine.begin() as conn:  # short: the reports only
        taken.finish(conn)
