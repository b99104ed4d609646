"""SQLAlchemy as reliable-job's database layer (PostgreSQL in production, SQLite embedded)."""

from reliable_job.integrations.sqlalchemy.database import SQLAlchemyDatabase, create_outbox_engine
from reliable_job.integrations.sqlalchemy.table import outbox_table

__all__ = ["SQLAlchemyDatabase", "create_outbox_engine", "outbox_table"]
