"""The relay's and completion's bookkeeping commits without waiting for the disk on PostgreSQL
(``synchronous_commit = off`` for the claim's transaction and the kept completion connection),
and nothing else does: the pool's connections, which staging uses, keep the server's setting."""

from __future__ import annotations

from sqlalchemy import text

from reliable_job.integrations.sqlalchemy.store import SQLAlchemyDatabase
from reliable_job.ports import StagedJob
from reliable_job.settings import Settings

SHOW = text("SELECT current_setting('synchronous_commit')")
DEFAULT = text("SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'")


def test_bookkeeping_commits_asynchronously_and_staging_does_not(postgres_url, table_name):
    database = SQLAlchemyDatabase(Settings(database_url=postgres_url, table_name=table_name))
    database.create_table()
    try:
        with database.engine.connect() as conn:
            server_default = conn.execute(DEFAULT).scalar()
        database.stager.stage([StagedJob("job-0", "t", "celery", '{"n": 0}', None)])
        with database.claim(10) as claim:
            assert [row.job_id for row in claim.rows] == ["job-0"]
            assert claim._conn.execute(SHOW).scalar() == "off"  # type: ignore[union-attr]
            claim.mark_sent([row.id for row in claim.rows])
        assert database._completion.run(lambda conn: conn.execute(SHOW).scalar()) == "off"
        assert database.complete_many(["job-0"]) == 1
        for _ in range(3):  # every connection the pool hands out: the claim's setting was local
            with database.engine.connect() as conn:
                assert conn.execute(SHOW).scalar() == server_default
    finally:
        database.close()
        database.table.drop(database.engine, checkfirst=True)
        database.engine.dispose()
