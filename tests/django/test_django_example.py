"""The example project's README steps, run as written (in a copy of the project, the Redis URL and
port pointed at the test servers), on SQLite (the README's default) and on PostgreSQL (with the
README's DATABASE_URL)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import ExitStack

import pytest
from sqlalchemy import create_engine, make_url, text

from reliable_job.processes import Process, free_port, wait_for
from tests.django.conftest import EXAMPLE, flush_redis

pytestmark = pytest.mark.e2e

README = EXAMPLE / "README.md"


def steps() -> list[str]:
    block = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def post(url: str, data: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The README's default (SQLite in the project directory), or PostgreSQL through the
    README's DATABASE_URL (a fresh database)."""
    if request.param == "sqlite":
        path = tmp_path / "django_project" / "db.sqlite3"

        def query(sql: str) -> list[tuple[object, ...]]:
            conn = sqlite3.connect(path, timeout=30)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        yield {}, query
        return
    url = make_url(os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"])
    name = f"rj_example_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine = create_engine(url.set(database=name))

    def query(sql: str) -> list[tuple[object, ...]]:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]

    yield (
        {
            "DATABASE_URL": url.set(drivername="postgresql", database=name).render_as_string(
                hide_password=False
            )
        },
        query,
    )
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_readme_steps_run_as_written(tmp_path, database):
    """migrate, a worker, the dev server, two requests: the committed order's task runs once, the
    failed view's never; the outbox ends empty."""
    redis_url = os.environ["RELIABLE_JOB_TEST_REDIS_URL"]
    flush_redis()
    project = tmp_path / "django_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("db.sqlite3*", "__pycache__"))
    port = str(free_port())
    db_env, query = database
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DJANGO_SETTINGS_MODULE" and not k.startswith("RELIABLE_JOB_")
    }
    env.update(db_env)
    background: list[Process] = []
    responses: list[tuple[int, bytes]] = []
    outputs: list[str] = []
    lines = steps()
    assert [line.split()[0] for line in lines] == [
        "export",
        "python",
        "celery",
        "python",
        "curl",
        "curl",
        "python",
    ]
    try:
        for line in lines:
            line = line.replace("redis://localhost:6379/0", redis_url).replace("8000", port)
            argv = shlex.split(line.removesuffix("&"))
            if argv[0] == "export":
                key, _, value = argv[1].partition("=")
                env[key] = value
                continue
            if argv[0] == "curl":
                responses.append(post(argv[-1], argv[argv.index("-d") + 1]))
                if len(responses) == 1:
                    wait_for(
                        lambda: query("SELECT count(*) FROM shop_receipt")[0][0] == 1,
                        timeout=60,
                        message="the receipt",
                    )
                continue
            if argv[0] == "python":
                argv[0] = sys.executable
            elif argv[0] == "celery":
                argv[:1] = [sys.executable, "-m", "celery"]
            if line.endswith("&"):
                proc = Process(argv, tmp_path / f"bg-{len(background)}.log", env=env, cwd=project)
                background.append(proc)
                if "worker" in argv:
                    proc.wait_for_line(r"ready\.", timeout=90)
                else:
                    proc.wait_until(lambda: _serving(port), timeout=60, message="the dev server")
                continue
            if argv[-1] == "status":
                # The failed view's job must never show up: let the worker settle first.
                wait_for(
                    lambda: query("SELECT count(*) FROM reliable_job_outbox")[0][0] == 0,
                    timeout=60,
                    message="the outbox to empty",
                )
            done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            outputs.append(done.stdout)
    finally:
        with ExitStack() as stack:  # every one stopped, even if one of them will not
            for proc in background:
                stack.callback(proc.stop, timeout=60, strict=True)

    (created_status, created), (failed_status, _) = responses
    assert created_status == 201
    order = json.loads(created)
    assert failed_status == 500
    assert query("SELECT id, item FROM shop_order") == [(order["order"], "book")]
    assert query("SELECT order_id, task_id FROM shop_receipt") == [(order["order"], order["job"])]
    assert outputs[-1].splitlines()[:3] == ["pending: 0", "sent (awaiting completion): 0", "dead: 0"]


def _serving(port: str) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True
