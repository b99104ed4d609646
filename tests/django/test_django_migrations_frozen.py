"""The Django migrations are frozen, and the guard on them works.

``migrations/0001_initial.py`` is a literal snapshot (it does not render ``reliable_job.schema``),
so an edit of ``schema.py`` changes the model alone and ``makemigrations --check`` reports it.
Each check runs ``makemigrations`` in a subprocess of its own (minimal settings, in-memory SQLite)
with ``reliable_job.schema`` edited before Django loads the model.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

MIGRATIONS = ROOT / "src" / "reliable_job" / "integrations" / "django" / "migrations"

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys

    import django
    from django.conf import settings

    from reliable_job import schema

    edit = json.loads(sys.argv[1])
    if edit.get("column"):
        name, changes = edit["column"]
        schema.COLUMNS = tuple(
            dataclasses.replace(c, **changes) if c.name == name else c for c in schema.COLUMNS
        )
    if edit.get("add_column"):
        schema.COLUMNS = (*schema.COLUMNS, schema.Column(**edit["add_column"]))
    if edit.get("index"):
        suffix, changes = edit["index"]
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        schema.INDEXES = tuple(
            dataclasses.replace(i, **changes) if i.suffix == suffix else i for i in schema.INDEXES
        )
    settings.configure(
        INSTALLED_APPS=["reliable_job.integrations.django"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
        RELIABLE_JOB=edit.get("settings", {}),
    )
    django.setup()
    from django.core.management import call_command

    if edit.get("sqlmigrate"):
        call_command("sqlmigrate", "reliable_job", "0001")
    call_command("makemigrations", "reliable_job", "--check", "--dry-run", verbosity=3)
    """
)


def makemigrations_check(**edit: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELIABLE_JOB_", "DJANGO_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(edit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )


def test_unedited_schema_needs_no_migration():
    result = makemigrations_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes detected" in result.stdout


def test_the_table_name_is_read_when_migrating():
    """Another ``table_name`` names the table, its indexes and constraint, and needs no migration."""
    result = makemigrations_check(settings={"table_name": "shop_outbox"}, sqlmigrate=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'CREATE TABLE "shop_outbox"' in result.stdout
    assert 'CONSTRAINT "uq_shop_outbox_job_id" UNIQUE ("job_id")' in result.stdout
    assert 'CREATE INDEX "ix_shop_outbox_pending" ON "shop_outbox" ("id") WHERE' in result.stdout
    assert 'CREATE INDEX "ix_shop_outbox_state" ON "shop_outbox" ("state", "sent_at")' in result.stdout
    assert "reliable_job_outbox" not in result.stdout


@pytest.mark.parametrize(
    ("edit", "reported"),
    [
        ({"column": ["state", {"length": 32}]}, "Alter field state on outboxjob"),
        ({"column": ["last_error", {"nullable": False}]}, "Alter field last_error on outboxjob"),
        ({"column": ["attempts", {"default": 1}]}, "Alter field attempts on outboxjob"),
        (
            {"add_column": {"name": "priority", "kind": "integer", "default": 0}},
            "Add field priority to outboxjob",
        ),
        (
            {"index": ["state", {"columns": ["state", "available_at"]}]},
            "Create index ix_reliable_job_outbox_state on field(s) state, available_at",
        ),
        (
            {"index": ["pending", {"where_pending": False}]},
            "Remove index ix_reliable_job_outbox_pending from outboxjob",
        ),
    ],
)
def test_a_schema_edit_without_a_migration_is_reported(edit, reported):
    result = makemigrations_check(**edit)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported in result.stdout, result.stdout


def test_the_migrations_do_not_render_the_schema():
    """A migration that imported the schema (or its Django rendering) would follow its edits and
    hide them from ``makemigrations``: only ``conf`` (for the table name) may be imported."""
    files = sorted(p for p in MIGRATIONS.glob("[0-9]*.py"))
    assert files
    for path in files:
        imported = set()
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        allowed = {
            "__future__.annotations",
            "django.db.migrations",
            "django.db.models",
            "reliable_job.integrations.django.conf",
        }
        assert imported <= allowed, (path.name, sorted(imported - allowed))
