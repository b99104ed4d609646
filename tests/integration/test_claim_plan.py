"""The relay's claim uses the partial index on pending rows, not a scan of the outbox.

Not a timing test: PostgreSQL's own plan (EXPLAIN, nothing executed) of the exact statement the
library runs to claim rows, captured from the store with a SQLAlchemy cursor event and explained
after the planner settings the claim makes (if any), on a table holding many sent rows (history
waiting for completion) and a few thousand pending ones, after ANALYZE. Without the partial index
(``schema.INDEXES``) the planner scans the table or walks the primary key past every sent row;
the last test proves the check notices that.
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
        for state, sent_at, count in (("sent", "now()", SENT_ROWS), ("pending", "NULL", PENDING_ROWS)):
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


def claim_statement(db: SQLAlchemyDatabase) -> tuple[list[str], str, Any]:
    """The statement with which ``claim`` picks its rows (the first one naming the outbox), its
    parameters, and the ``SET`` statements the claim ran before it in the same transaction
    (planner settings such as ``SET LOCAL``)."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.claim(500) as claim:
            assert len(claim.rows) == 500
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    settings: list[str] = []
    for statement, parameters in seen:
        if db.table.name in statement:
            return settings, statement, parameters
        if statement.lstrip().upper().startswith("SET "):
            settings.append(statement)
    raise AssertionError(f"claim ran no statement on the outbox: {seen}")


def plan(db: SQLAlchemyDatabase, settings: list[str], statement: str, parameters: Any) -> str:
    """PostgreSQL's plan for ``statement`` after ``settings``, in one transaction rolled back
    (EXPLAIN only: nothing is executed)."""
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for setting in settings:
            cursor.execute(setting)
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
    claim_plan = plan(database, *claim_statement(database))
    assert f"Seq Scan on {database.table.name}" not in claim_plan, claim_plan
    assert pending_index(database) in claim_plan, claim_plan


def test_the_plan_check_notices_a_missing_index(database: SQLAlchemyDatabase) -> None:
    """Control: the same claim without the partial index is planned differently, so the test above
    fails if the index goes away or stops matching the claim's WHERE clause."""
    index = pending_index(database)
    with database.engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {schema.validate_table_name(index)}"))
        conn.execute(text(f"ANALYZE {database.table.name}"))
    assert index not in plan(database, *claim_statement(database))
