"""The CLI as an operator runs it, from a project directory: apps found as ``celery -A`` finds them,
``celery -A proj reliable-job``, ``check`` thresholds, the heartbeat file and rows, and relays that
refuse a permanently wrong configuration. Real console scripts and relay processes, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import Engine, MetaData, Table, make_url, update

from reliable_job.integrations.sqlalchemy.relays import relays_table
from reliable_job.processes import Process, free_port, wait_for
from tests.conftest import count_rows

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def write_project(root: Path, broker_url: str, database_url: str, table_name: str) -> None:
    """``proj/`` in Celery's layout: ``proj/celery.py`` makes the app, ``proj/__init__.py`` imports it."""
    (root / "proj").mkdir()
    (root / "proj" / "__init__.py").write_text("from .celery import app\n")
    (root / "proj" / "celery.py").write_text(
        textwrap.dedent(
            f"""
            import os
            from celery import Celery
            from reliable_job.integrations.celery import install

            app = Celery("proj", broker=os.environ.get("PROJ_BROKER", {broker_url!r}))
            install(app, database_url={database_url!r}, table_name={table_name!r}, poll_interval=0.05,
                    heartbeat_interval=0.2, listen_notify=False)

            @app.task(reliable_job=True)
            def add(x, y):
                return x + y
            """
        )
    )


def env(**extra: str) -> dict[str, str]:
    """The environment without this checkout on PYTHONPATH: the project is found from the cwd."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_JOB_") and k != "PYTHONPATH"}
    out.update(extra)
    return out


def run(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=90)


def rj(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run(cwd, str(BIN / "reliable-job"), *args, **extra)


@pytest.fixture
def project(tmp_path: Path, database_url: str, table_name: str, redis_url: str, engine: Engine) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    write_project(root, redis_url, database_url, table_name)
    out = rj(root, "-A", "proj", "init-db")
    assert out.returncode == 0, out.stderr
    yield root
    tables = MetaData()
    tables.reflect(engine, only=lambda name, _: name.startswith(table_name))
    tables.drop_all(engine)


def outbox_of(engine: Engine, table_name: str) -> Table:
    tables = MetaData()
    tables.reflect(engine, only=[table_name])
    return tables.tables[table_name]


def stage(root: Path, n: int = 1) -> None:
    code = f"from proj.celery import add\nfor i in range({n}): add.delay(i, 1)\n"
    out = run(root, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("spec", ["proj", "proj:app", "proj.celery:app", "proj.celery"])
def test_relay_finds_the_app_as_celery_does(project, spec, engine, table_name, redis_url, tmp_path):
    """`reliable-job -A <spec> relay` from the project directory publishes a staged job, touches its
    heartbeat file, records its row (status --json shows its last pass), and exits 0 on SIGTERM."""
    stage(project)
    outbox = outbox_of(engine, table_name)
    heartbeat = tmp_path / "relay.alive"
    argv = [str(BIN / "reliable-job"), "-A", spec, "relay", "--heartbeat-file", str(heartbeat)]
    with Process(argv, tmp_path / "relay.log", env=env(), cwd=project, name="relay") as relay:
        relay.wait_until(lambda: count_rows(engine, outbox, state="sent") == 1, message="the job published")
        assert redis_lib.Redis.from_url(redis_url).llen("celery") == 1
        first = relay.wait_until(lambda: heartbeat.exists() and heartbeat.stat().st_mtime_ns)
        relay.wait_until(
            lambda: heartbeat.stat().st_mtime_ns > first, message="the heartbeat file to advance"
        )

        def relay_row() -> dict[str, object] | None:
            status = json.loads(rj(project, "-A", spec, "status", "--json").stdout)
            rows = [r for r in status["relays"] if r["published"] == 1]
            return rows[0] if rows else None

        row = relay.wait_until(relay_row, message="the relay's heartbeat row")
        assert row["last_pass_seconds_ago"] is not None and row["listening"] is False
        assert relay.stop(signal.SIGTERM, 30, strict=True) == 0
    # a relay that stopped cleanly deletes its row
    assert json.loads(rj(project, "-A", spec, "status", "--json").stdout)["relays"] == []


def test_celery_command_runs_reliable_job(project, engine, table_name):
    """`celery -A proj reliable-job status --json` runs our command on the app Celery resolved."""
    stage(project, 2)
    out = run(project, str(BIN / "celery"), "-A", "proj", "reliable-job", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["pending"], status["sent"], status["dead"]) == (2, 0, 0)
    assert set(status) >= {"oldest_pending_seconds", "oldest_sent_seconds", "relays"}
    check = run(project, str(BIN / "celery"), "-A", "proj", "reliable-job", "check", "--max-dead", "0")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok pending=2 ")


def test_check_exits_non_zero_with_one_line_per_threshold(project, engine, table_name, redis_url):
    """Healthy: exit 0 and one `ok` line. Each threshold crossed: exit 1 and one line saying why."""
    stage(project, 3)
    healthy = rj(project, "-A", "proj", "check", "--max-pending-age", "600", "--max-dead", "0")
    assert (healthy.returncode, len(healthy.stdout.splitlines())) == (0, 1), healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("ok pending=3 sent=0 dead=0")

    outbox = outbox_of(engine, table_name)
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == 1).values(created_at=old))
        conn.execute(update(outbox).where(outbox.c.id == 2).values(state="sent", sent_at=old))
        conn.execute(update(outbox).where(outbox.c.id == 3).values(state="dead"))
    cases = {
        "--max-pending-age": ("60", "pending too long"),
        "--max-sent-age": ("60", "sent too long"),
        "--max-dead": ("0", "too many dead jobs: 1"),
        "--max-relay-silence": ("30", "no relay has reported"),
    }
    for option, (value, why) in cases.items():
        out = rj(project, "-A", "proj", "check", option, value)
        assert out.returncode == 1, (option, out.stdout, out.stderr)
        assert out.stdout.splitlines() == [out.stdout.strip()] and why in out.stdout, (option, out.stdout)
    every = [arg for option, (value, _) in cases.items() for arg in (option, value)]
    out = rj(project, "-A", "proj", "status", "--check", *every)
    assert out.returncode == 1 and len(out.stdout.splitlines()) == 4, out.stdout

    # a relay silent for longer than allowed
    relays = relays_table(MetaData(), table_name)
    with engine.begin() as conn:
        conn.execute(
            relays.insert().values(
                relay_id="h:1:x", started_at=old, last_pass_at=old, beat_at=old, published=5, listening=0
            )
        )
    out = rj(project, "-A", "proj", "check", "--max-relay-silence", "60")
    assert out.returncode == 1 and "relays silent: the last relay pass was" in out.stdout, out.stdout

    # the broker (with -A) and the database unreachable
    closed = f"redis://127.0.0.1:{free_port()}/0"
    out = rj(project, "-A", "proj", "check", PROJ_BROKER=closed)
    assert out.returncode == 1 and out.stdout.startswith("broker unreachable:"), out.stdout + out.stderr
    out = rj(project, "check", "--database-url", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    assert out.returncode == 1 and out.stdout.startswith("database unreachable:"), out.stdout + out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    # a database that refuses the configuration for good is told from an outage
    for url, table, kind in wrong_configurations(
        str(engine.url.render_as_string(hide_password=False)), table_name
    ):
        out = rj(project, "check", "--database-url", url, "--table", table)
        line = out.stdout.strip()
        assert out.returncode == 1 and line.startswith("database refuses the configuration:"), (
            line + out.stderr
        )
        assert kind in line and "s3cret" not in out.stdout + out.stderr


def wrong_configurations(database_url: str, table_name: str) -> list[tuple[str, str, str]]:
    """(database URL, table, the kind the one line names) for each permanently wrong configuration."""
    url = make_url(database_url)
    cases = [(database_url, "no_such_outbox", "outbox table missing")]
    if url.get_backend_name() == "postgresql":
        cases += [
            (
                url.set(username="nosuchrole", password="s3cret").render_as_string(hide_password=False),
                table_name,
                "authentication refused",
            ),
            (
                url.set(database="no_such_database").render_as_string(hide_password=False),
                table_name,
                "unknown database",
            ),
        ]
    # SQLite creates a missing file (then its table is missing); a missing directory is an outage
    return cases


def test_a_relay_refuses_a_wrong_configuration_in_one_line(project, database_url, table_name):
    """Authentication refused, an unknown database, a missing outbox table: the relay exits 2 with
    one line naming which, no traceback, no password (the test server trusts every login, so a
    refused login is a role that does not exist)."""
    for url, table, kind in wrong_configurations(database_url, table_name):
        out = rj(project, "-A", "proj", "relay", "--database-url", url, "--table", table)
        assert out.returncode == 2, (kind, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"reliable-job: error: {kind}"), (kind, out.stderr)
        assert "s3cret" not in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_database_is_waited_out_with_one_line(project, tmp_path):
    """A database that does not answer is an outage, not a configuration error: the relay says so
    once and keeps waiting (SIGTERM stops it, exit 0)."""
    url = f"postgresql+psycopg://u:s3cret@127.0.0.1:{free_port()}/x"
    argv = [str(BIN / "reliable-job"), "-A", "proj", "relay", "--database-url", url]
    with Process(argv, tmp_path / "waiting.log", env=env(), cwd=project, name="relay") as relay:
        relay.wait_for_line(r"outbox database unreachable, waiting for it")
        wait_for(lambda: "relay paused" in relay.log(), timeout=30)
        assert relay.alive()
        assert relay.stop(signal.SIGTERM, 30, strict=True) == 0
        assert "s3cret" not in relay.log()


def test_a_base_install_names_the_extra(tmp_path):
    """Without Celery (or SQLAlchemy), the command says which extra to install, in one line."""
    for blocked, argv, extra in [
        ("celery", ["-A", "proj", "relay"], "celery"),
        ("sqlalchemy", ["status"], "sqlalchemy"),
    ]:
        code = (
            f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from reliable_job.cli import main\nsys.exit(main({argv!r}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env()
        )
        assert out.returncode == 2, out.stderr
        assert (
            out.stderr.strip()
            == f"reliable-job: error: this command needs {blocked}: pip install 'reliable-job[{extra}]'"
        )


def test_a_missing_database_driver_names_the_extra(tmp_path, redis_url):
    """A PostgreSQL URL without psycopg installed, from the app's ``install()`` (which Celery's
    ``find_app`` wraps in a ``ValueError``) or from ``--database-url``: the ``postgres`` extra, in one
    line, not ``bad database URL: No module named 'psycopg'``."""
    url = "postgresql+psycopg://user@127.0.0.1:1/db"
    write_project(tmp_path, redis_url, url, "reliable_job_outbox")
    for argv in (
        ["-A", "proj", "status"],
        ["status", "--database-url", url],
        ["jobs", "list", "--database-url", url],
    ):
        code = (
            "import sys; sys.modules['psycopg'] = None\n"
            f"from reliable_job.cli import main\nsys.exit(main({argv!r}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env()
        )
        assert out.returncode == 2, out.stderr
        assert (
            out.stderr.strip()
            == "reliable-job: error: this command needs psycopg: pip install 'reliable-job[postgres]'"
        )


def test_the_relay_in_a_worker_touches_its_heartbeat_file(services, tmp_path):
    """The in-worker relay takes ``heartbeat_file`` from the one Settings object (here
    ``RELIABLE_JOB_HEARTBEAT_FILE``) and touches it while it runs."""
    heartbeat = tmp_path / "worker-relay.alive"
    worker = services.worker(RELIABLE_JOB_HEARTBEAT_FILE=str(heartbeat))
    first = worker.wait_until(lambda: heartbeat.exists() and heartbeat.stat().st_mtime_ns, message="the file")
    worker.wait_until(lambda: heartbeat.stat().st_mtime_ns > first, message="the heartbeat file to advance")
    assert services.stop(worker) == 0, services.log(worker)
