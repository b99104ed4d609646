"""The relay's claim uses the partial index on pending rows, not a scan of the outbox.

Not a timing test: PostgreSQL's own plan (EXPLAIN, nothing executed) of the exact statements the
library runs when it claims, captured from the store with a SQLAlchemy cursor event, on a table
holding many sent rows (history waiting for completion) and a few thousand pending ones, after
ANALYZE. Without the partial index (``schema.INDEXES``) the planner scans the table or walks the
primary key past every sent row; the last test proves the check notices that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from reliable_job import schema
from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase
from reliable_job.settings import Settings

pytestmark = pytest.mark.postgres

SENT_ROWS = 20_000
PENDING_ROWS = 3_000


@pytest.fixture
def database(postgres_url: str, table_name: str) -> Iterator[SQLAlchemyDatabase]:
    db = SQLAlchemyDatabase(Settings(database_url=postgres_url, table_name=table_name))
    db.create_table()
    t = schema.validate_table_name(table_name)
    with db.engine.begin() as conn:
        # old rows first (sent, awaiting completion), the backlog after them: claim order is id
        for state, sent_at, count in (("sent", "now()", SENT_ROWS),
                                      ("pending", "NULL", PENDING_ROWS)):
            conn.execute(
                text(
                    f"INSERT INTO {t} (job_id, task_name, queue, message, state, created_at, "
                    "updated_at, sent_at) SELECT gen_random_uuid()::text, 'bench.noop', 'celery', "
                    f"'{{\"v\": 1}}', :state, now(), now(), {sent_at} FROM generate_series(1, :n)"
                ),
                {"state": state, "n": count},
            )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"VACUUM (ANALYZE) {t}"))
    yield db
    db.table.drop(db.engine)
    db.engine.dispose()


def claim_statements(db: SQLAlchemyDatabase) -> list[tuple[str, Any]]:
    """Every statement touching the outbox that ``claim`` runs, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if db.table.name in statement:
            seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.claim(500) as claim:
            assert len(claim.rows) == 500
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    return seen


def plan(db: SQLAlchemyDatabase, statement: str, parameters: Any) -> str:
    """PostgreSQL's plan for ``statement`` (EXPLAIN only: nothing is executed)."""
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN " + statement, parameters)
        lines = [row[0] for row in cursor.fetchall()]
        raw.rollback()
    finally:
        raw.close()
    return "\n".join(lines)


def pending_index(db: SQLAlchemyDatabase) -> str:
    (index,) = [i for i in schema.INDEXES if i.where_pending]
    return index.name(db.table.name)


def test_claim_uses_the_partial_pending_index(database: SQLAlchemyDatabase) -> None:
    statements = claim_statements(database)
    assert statements, "claim ran no statement on the outbox"
    plans = [plan(database, s, p) for s, p in statements]
    for p in plans:
        assert f"Seq Scan on {database.table.name}" not in p, p
    # the statement that picks the rows (the first one) walks the partial index of pending rows
    assert pending_index(database) in plans[0], plans[0]


def test_the_plan_check_notices_a_missing_index(database: SQLAlchemyDatabase) -> None:
    """Control: the same claim without the partial index is planned differently, so the test above
    fails if the index goes away or stops matching the claim's WHERE clause."""
    index = pending_index(database)
    with database.engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {schema.validate_table_name(index)}"))
        conn.execute(text(f"ANALYZE {database.table.name}"))
    statement, parameters = claim_statements(database)[0]
    assert index not in plan(database, statement, parameters)
