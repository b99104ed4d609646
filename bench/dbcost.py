"""The database's cost of a stretch of work: statements executed and WAL bytes written.

Figures that do not depend on the CPU: the same code path issues the same statements and writes
the same WAL whatever the machine's speed or load.

* WAL bytes: the difference of ``pg_current_wal_insert_lsn()`` (what ``pg_wal_lsn_diff`` computes)
  before and after. The insert position, not the flushed one: the bench's server runs with
  ``synchronous_commit=off``, so the flushed position lags.
* Statements: the sum of ``calls`` in ``pg_stat_statements`` for the bench's database (every
  top-level statement of every session, ``BEGIN``, ``COMMIT``, ``SET LOCAL`` and ``LISTEN``
  included), when the server preloads it (``scripts/run-bench.sh`` starts it so). The harness's
  own monitoring queries carry the :data:`MONITOR` comment and are left out.

Both count everything on the server in the window: the harness only measures windows in which
nothing else runs against the database (autovacuum aside, see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.common import MONITOR, Env, log

_PER_QUERY = (
    f"SELECT {MONITOR} userid, queryid, toplevel, left(regexp_replace(query, '\\s+', ' ', 'g'), 140), "
    "calls, rows FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND query NOT LIKE '%%bench:monitor%%'"
)


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


@dataclass
class Snapshot:
    wal: int
    queries: dict[tuple[int, int, bool], tuple[str, int, int]] | None
    """(userid, queryid, toplevel) -> (query text, calls, rows); ``None`` without pg_stat_statements."""


@dataclass
class Cost:
    wal_bytes: int
    statements: int | None
    top: list[dict[str, Any]] = field(default_factory=list)
    """The statements run most in the window: query text, calls, rows."""

    def per_job(self, jobs: int) -> dict[str, float | None]:
        return {
            "statements_per_job": None if self.statements is None else round(self.statements / jobs, 3),
            "wal_bytes_per_job": round(self.wal_bytes / jobs, 1),
        }


class DbMeter:
    """Takes :class:`Snapshot` s on a connection of its own; :meth:`cost` of the work between two."""

    def __init__(self, env: Env) -> None:
        self.conn = env.pg()
        self.statements = self._enable_statements()

    def _enable_statements(self) -> bool:
        row = self.conn.execute(f"SHOW {MONITOR} shared_preload_libraries").fetchone()
        if not row or "pg_stat_statements" not in str(row[0]):
            log("dbcost: pg_stat_statements is not preloaded: statements per job are not counted")
            return False
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except psycopg.Error as exc:
            log(f"dbcost: pg_stat_statements unavailable ({exc}): statements per job are not counted")
            return False
        return True

    def snapshot(self) -> Snapshot:
        row = self.conn.execute(f"SELECT {MONITOR} pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        queries = None
        if self.statements:
            queries = {
                (int(u), int(q), bool(t)): (str(text), int(c), int(r))
                for u, q, t, text, c, r in self.conn.execute(_PER_QUERY).fetchall()
            }
        return Snapshot(_lsn(str(row[0])), queries)

    def cost(self, before: Snapshot, after: Snapshot, top: int = 0) -> Cost:
        statements = None
        ranked: list[dict[str, Any]] = []
        if before.queries is not None and after.queries is not None:
            deltas = []
            for key, (text, calls, rows) in after.queries.items():
                _, calls0, rows0 = before.queries.get(key, (text, 0, 0))
                if calls > calls0:
                    deltas.append((calls - calls0, rows - rows0, text))
            statements = sum(d[0] for d in deltas)
            deltas.sort(reverse=True)
            ranked = [{"query": text, "calls": calls, "rows": rows} for calls, rows, text in deltas[:top]]
        return Cost(after.wal - before.wal, statements, ranked)

    def close(self) -> None:
        self.conn.close()


def summary(costs: Sequence[Cost], jobs: int) -> dict[str, Any]:
    """Per job over several windows of one kind (totals, so no window's rounding is kept), with
    each window's own figures."""
    statements = [c.statements for c in costs]
    counted = None if None in statements else sum(s or 0 for s in statements)
    total = Cost(sum(c.wal_bytes for c in costs), counted)
    return {
        **total.per_job(jobs),
        "jobs": jobs,
        "wal_bytes_rounds": [c.wal_bytes for c in costs],
        "statements_rounds": statements,
    }
