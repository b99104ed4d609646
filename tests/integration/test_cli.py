"""The reliable-job command line, run as a real subprocess against SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.orm import Session

from reliable_job.integrations.sqlalchemy import outbox_table
from tests.conftest import ROOT, count_rows


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reliable_job.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_status_json(celery_app, engine, outbox, database_url, table_name):
    """`status --json` prints one JSON object with the four documented keys."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        for i in range(3):
            record.apply_async((i,), reliable_job_session=session)
        session.commit()
    with engine.begin() as conn:
        conn.execute(outbox.update().where(outbox.c.id == 1).values(state="dead"))
    out = cli("status", "--json", "--database-url", database_url, "--table", table_name)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert set(status) == {
        "pending",
        "sent",
        "dead",
        "oldest_pending_seconds",
        "oldest_sent_seconds",  # issue 10: health figures
        "estimated",
        "relays",
    }
    assert (status["pending"], status["sent"], status["dead"]) == (2, 0, 1)
    assert 0 <= status["oldest_pending_seconds"] < 60

    human = cli("status", "--database-url", database_url, "--table", table_name)
    assert "pending: 2" in human.stdout and "dead: 1" in human.stdout

    retried = cli("retry-dead", "--database-url", database_url, "--table", table_name)
    assert retried.returncode == 0 and "1 dead job(s)" in retried.stdout
    assert count_rows(engine, outbox, state="pending") == 3


def test_init_db_creates_the_table(database_url, table_name, engine):
    """`init-db` creates the outbox table with its indexes, and is idempotent."""
    for _ in range(2):
        out = cli("init-db", "--database-url", database_url, "--table", table_name)
        assert out.returncode == 0, out.stderr
    insp = inspect(engine)
    assert {c["name"] for c in insp.get_columns(table_name)} >= {
        "id",
        "job_id",
        "task_name",
        "queue",
        "message",
        "state",
        "attempts",
        "last_error",
        "created_at",
        "sent_at",
        "updated_at",
    }
    assert f"ix_{table_name}_pending" in {i["name"] for i in insp.get_indexes(table_name)}
    outbox_table(MetaData(), table_name).drop(engine)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_prints_ddl(dialect):
    """`migration --dialect` prints the CREATE TABLE and the partial index for that dialect."""
    out = cli("migration", "--dialect", dialect)
    assert out.returncode == 0
    assert "CREATE TABLE reliable_job_outbox" in out.stdout
    assert "WHERE state = 'pending'" in out.stdout


def test_alembic_revision_creates_the_same_table_as_init_db(postgres_url, tmp_path, table_name):
    """The Alembic revision and init-db render one schema: same columns, types, indexes."""
    versions = tmp_path / "versions"
    versions.mkdir()
    out = cli("migration", "--alembic-dir", str(versions), "--revision", "r1", "--table", table_name)
    assert out.returncode == 0, out.stderr
    (tmp_path / "env.py").write_text(
        "from alembic import context\n"
        "from sqlalchemy import create_engine\n"
        "engine = create_engine(context.config.get_main_option('sqlalchemy.url'))\n"
        "with engine.connect() as connection:\n"
        "    context.configure(connection=connection,\n"
        "                      version_table=context.config.get_main_option('version_table'))\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
    )
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    config.set_main_option("sqlalchemy.url", postgres_url)
    config.set_main_option("version_table", f"alembic_version_{table_name}")
    command.upgrade(config, "head")

    engine = create_engine(postgres_url)
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        diffs = compare_metadata(
            MigrationContext.configure(conn), outbox_table(MetaData(), table_name).metadata
        )
    assert [d for d in diffs if concerns(d, table_name)] == [], "autogenerate sees no difference"

    other = f"{table_name}_b"
    assert cli("init-db", "--database-url", postgres_url, "--table", other).returncode == 0

    def shape(name: str) -> tuple[object, ...]:
        insp = inspect(engine)
        columns = [
            (c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in insp.get_columns(name)
        ]
        indexes = sorted(
            (i["name"].replace(name, "T"), tuple(i["column_names"]), str(i.get("dialect_options")))
            for i in insp.get_indexes(name)
        )
        uniques = sorted(u["name"].replace(name, "T") for u in insp.get_unique_constraints(name))
        return columns, indexes, uniques

    a, b = shape(table_name), shape(other)
    assert a[1:] == b[1:]
    # column defaults mention the sequence name, which differs by table name
    assert [c[:3] for c in a[0]] == [c[:3] for c in b[0]]
    command.downgrade(config, "base")
    with engine.begin() as conn:
        conn.execute(text(f'DROP TABLE "{other}"'))
        conn.execute(text(f'DROP TABLE IF EXISTS "alembic_version_{table_name}"'))
    engine.dispose()


def concerns(diff, table_name: str) -> bool:
    """Whether an Alembic autogenerate diff is about ``table_name`` (the database has others)."""
    diff = diff[0] if isinstance(diff, list) else diff
    kind, target = diff[0], diff[1]
    if kind.endswith("_table"):
        return target.name == table_name
    if kind.endswith(("_index", "_constraint")):
        return target.table.name == table_name
    return diff[2] == table_name


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--database-url", "nosuchdriver://x"],
        ["status", "--database-url", "postgresql+psycopg://user:s3cret@127.0.0.1:1/db"],
        ["init-db", "--database-url", "sqlite:////nonexistent-dir/x.db"],
        ["status", "--table", "bad name; drop"],
        ["relay", "--app", "no.such.module:app"],
    ],
)
def test_bad_input_gives_one_line_error(args):
    """Bad URLs, names and apps give a one-line error, exit 2, no traceback, no password."""
    out = cli(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("reliable-job: error:")
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and "s3cret" not in out.stderr


def test_relay_with_a_bad_broker_url_exits_with_one_line(tmp_path):
    """A broker URL with an unknown transport is a configuration error, not an outage."""
    (tmp_path / "badbroker.py").write_text(
        "from celery import Celery\napp = Celery('b', broker='nosuchtransport://x')\n"
    )
    env = {
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
        "PATH": "/usr/bin:/bin",
        "RELIABLE_JOB_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
    }
    out = cli("relay", "--app", "badbroker:app", env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("reliable-job: error: bad broker URL")


def test_relay_builds_from_the_installed_settings_plus_its_options(tmp_path, monkeypatch):
    """`relay --app` keeps every setting of the app's installed runtime (keyword arguments,
    Celery configuration) and applies --batch-size, --table and --database-url over them."""
    from reliable_job import cli as cli_module

    (tmp_path / "installedapp.py").write_text(
        "from celery import Celery\n"
        "from reliable_job.integrations.celery import install\n"
        "app = Celery('installed', broker='memory://')\n"
        "app.conf.reliable_job_poll_interval = 0.7\n"
        f"install(app, database_url='sqlite:///{tmp_path / 'a.db'}', hot_poll=0.05, "
        "listen_notify=False, backoff_cap=3.0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    relays = []
    monkeypatch.setattr(cli_module, "run_until_signalled", relays.append)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    argv = ["relay", "--app", "installedapp:app", "--batch-size", "7", "--table", "cli_outbox"]
    assert cli_module.main([*argv, "--database-url", url]) == 0
    (relay,) = relays
    assert (relay.batch_size, relay.store.table.name, str(relay.store.engine.url)) == (7, "cli_outbox", url)
    assert (relay.hot_poll, relay.poll_interval, relay.backoff_cap) == (0.05, 0.7, 3.0)
    assert not relay.listens
    relay.store.engine.dispose()
    sys.modules.pop("installedapp", None)
