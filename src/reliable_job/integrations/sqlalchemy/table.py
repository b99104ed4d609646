"""The outbox as a SQLAlchemy Core ``Table``, rendered from :mod:`reliable_job.schema`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeEngine

from reliable_job import schema


def _type(column: schema.Column) -> TypeEngine[Any]:
    if column.kind == "id":
        return BigInteger().with_variant(Integer(), "sqlite")
    if column.kind == "string":
        return String(column.length)
    if column.kind == "text":
        return Text()
    if column.kind == "integer":
        return Integer()
    return DateTime(timezone=True)


def outbox_table(metadata: MetaData, name: str = schema.DEFAULT_TABLE_NAME) -> Table:
    """The outbox table attached to ``metadata`` (so Alembic autogenerate sees it).

    Returns the table already in ``metadata`` when there is one of that name.
    """
    name = schema.validate_table_name(name)
    if name in metadata.tables:
        return metadata.tables[name]
    columns = []
    for col in schema.COLUMNS:
        default = None
        if col.default is not None:
            default = (
                text(f"'{col.default}'") if isinstance(col.default, str) else text(str(int(col.default)))
            )
        columns.append(
            Column(
                col.name,
                _type(col),
                primary_key=col.kind == "id",
                autoincrement=col.kind == "id",
                nullable=col.nullable,
                server_default=default,
            )
        )
    uniques = [UniqueConstraint(col.name, name=col.unique_name(name)) for col in schema.COLUMNS if col.unique]
    table = Table(name, metadata, *columns, *uniques)
    for index in schema.INDEXES:
        where = table.c.state == schema.PENDING if index.where_pending else None
        Index(
            index.name(name),
            *(table.c[c] for c in index.columns),
            postgresql_where=where,
            sqlite_where=where,
        )
    return table
