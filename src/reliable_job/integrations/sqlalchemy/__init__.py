"""SQLAlchemy as reliable-job's database layer (PostgreSQL in production, SQLite embedded).

By concern: ``engine`` (engines, SQLite pragmas, fork safety, the connection completion keeps),
``statements`` (every statement the outbox runs), ``writers`` (staging), ``claims`` (the relay's
claims), ``listen`` (PostgreSQL ``LISTEN``), ``store`` (:class:`SQLAlchemyDatabase`, tying them).
"""

from reliable_job.integrations.sqlalchemy.engine import create_outbox_engine, sqlite_immediate
from reliable_job.integrations.sqlalchemy.store import SQLAlchemyDatabase
from reliable_job.integrations.sqlalchemy.table import outbox_table

__all__ = ["SQLAlchemyDatabase", "create_outbox_engine", "outbox_table", "sqlite_immediate"]
