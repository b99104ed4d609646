"""The relay's claims, named for how they take their rows: by ``SELECT`` (SQLite, one writer at a
time) or by ``UPDATE ... RETURNING`` (PostgreSQL, ``SKIP LOCKED``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Connection, Engine

from reliable_job.integrations.sqlalchemy.statements import CLAIM_PLAN, OutboxStatements, utcnow
from reliable_job.ports import ClaimedRow


class ClaimBySelect:
    """Rows read by ``SELECT`` and marked as the relay reports them (SQLite, others): a row the
    relay does not report was never changed."""

    def __init__(self, conn: Connection, statements: OutboxStatements, rows: Sequence[ClaimedRow]) -> None:
        self._conn = conn
        self._sql = statements
        self.rows: Sequence[ClaimedRow] = rows

    def mark_sent(self, ids: Sequence[int]) -> None:
        if ids:
            self._conn.execute(self._sql.mark_sent, {"ids": list(ids), "now": utcnow()})

    def mark_failed(self, row: ClaimedRow, error: str, *, retry_in: float | None) -> None:
        _mark_failed(self._conn, self._sql, row, error, retry_in)

    def defer(self, row: ClaimedRow, retry_in: float) -> None:
        _defer(self._conn, self._sql, row, retry_in)

    def finish(self) -> None:
        """Nothing to undo: unmarked rows were never changed."""


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
    """Claim up to ``limit`` publishable rows in a transaction of ``engine`` (its claim engine:
    ``BEGIN IMMEDIATE`` on SQLite), committed when the block ends."""
    now = utcnow()
    params = {"now": now, "limit": limit}
    with engine.begin() as conn:
        taken: ClaimBySelect | ClaimByUpdate
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(CLAIM_PLAN)
            rows = sorted(
                (
                    ClaimedRow(row_id, job_id, message, attempts - 1)
                    for row_id, job_id, message, attempts in conn.execute(statements.claim_by_update, params)
                ),
                key=_by_id,
            )
            taken = ClaimByUpdate(conn, statements, rows)
        else:
            rows = [ClaimedRow(*r) for r in conn.execute(statements.claim_by_select, params)]
            taken = ClaimBySelect(conn, statements, rows)
        yield taken
        taken.finish()
