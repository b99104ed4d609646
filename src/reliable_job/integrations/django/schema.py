"""The outbox table as Django model fields and options, rendered from :mod:`reliable_job.schema`.

The model (``models.py``) is built from these functions; the migrations are not (they are frozen
snapshots, as ``makemigrations`` writes them). So an edit of ``reliable_job/schema.py`` shows up
as a change of the model, which ``makemigrations --check`` reports until a new migration in
``migrations/`` (and the matching Alembic revision) records it.
``tests/django/test_django_schema.py`` checks both.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from reliable_job import schema


def field(column: schema.Column) -> Any:
    if column.kind == "id":
        return models.BigAutoField(primary_key=True, serialize=False, help_text=column.doc)
    options: dict[str, Any] = {"null": column.nullable, "help_text": column.doc}
    if column.nullable:
        options["blank"] = True
    if column.default is not None:
        # In the table (as the SQLAlchemy table has it) and in Python, for the ORM's inserts.
        options["db_default"] = column.default
        options["default"] = column.default
    if column.kind == "string":
        return models.CharField(max_length=column.length, **options)
    if column.kind == "text":
        return models.TextField(**options)
    if column.kind == "integer":
        return models.IntegerField(**options)
    return models.DateTimeField(**options)


def fields() -> list[tuple[str, Any]]:
    return [(column.name, field(column)) for column in schema.COLUMNS]


def options(table_name: str) -> dict[str, Any]:
    """``Meta`` options: the table name, its unique constraint and its indexes."""
    table_name = schema.validate_table_name(table_name)
    return {
        "db_table": table_name,
        "ordering": ["id"],
        "verbose_name": "outbox job",
        "verbose_name_plural": "outbox jobs",
        "constraints": [
            models.UniqueConstraint(fields=[c.name], name=c.unique_name(table_name))
            for c in schema.COLUMNS
            if c.unique
        ],
        "indexes": [
            models.Index(
                fields=list(index.columns),
                name=index.name(table_name),
                condition=models.Q(state=schema.PENDING) if index.where_pending else None,
            )
            for index in schema.INDEXES
        ],
    }


def relay_fields() -> list[tuple[str, Any]]:
    """The relays' heartbeat table's fields; the first column is the primary key."""
    first, *rest = schema.RELAY_COLUMNS
    key = models.CharField(max_length=first.length, primary_key=True, serialize=False, help_text=first.doc)
    return [(first.name, key), *((column.name, field(column)) for column in rest)]


def relay_options(table_name: str) -> dict[str, Any]:
    """``Meta`` options of the relays' heartbeat table ``<table_name>_relays``."""
    return {
        "db_table": schema.relays_table_name(table_name),
        "ordering": ["relay_id"],
        "verbose_name": "relay",
        "verbose_name_plural": "relays",
    }
