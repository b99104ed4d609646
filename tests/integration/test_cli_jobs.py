"""``reliable-job jobs``: list, show, retry-dead, purge, publish-now on real SQLite and PostgreSQL
(``main(argv)`` in-process, and a subprocess on a pty for the progress line)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import pty
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reliable_job import cli
from tests.conftest import ROOT, count_rows, outbox_rows


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def db_args(database_url, table_name):
    """The database options (not named `db`: pytest-django would take it for its own fixture
    and run these tests among the Django ones, with Django's Celery app not finalized yet)."""
    return ["--database-url", database_url, "--table", table_name]


@pytest.fixture
def staged(celery_app, engine, outbox):
    """Five jobs: record a/b/c (c dead, staged 10 days ago), always_fail d (dead, 2 hours ago),
    fail_then_succeed with non-ASCII and nested arguments (pending, waiting on a backoff)."""
    from tests.apps.celery_app import always_fail, fail_then_succeed, record

    with Session(engine) as session:
        ids = {m: record.apply_async((m,), reliable_job_session=session).id for m in "abc"}
        ids["d"] = always_fail.apply_async(("d",), reliable_job_session=session).id
        ids["nested"] = fail_then_succeed.apply_async(
            ("café ✓ 東京",),
            {"failures": {"deep": ["ü", {"n": [1, 2.5, None, True]}]}, "countdown": 0},
            reliable_job_session=session,
        ).id
        session.commit()
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        t = outbox
        conn.execute(
            update(t)
            .where(t.c.job_id == ids["c"])
            .values(state="dead", last_error="ValueError: c", created_at=now - timedelta(days=10))
        )
        conn.execute(
            update(t)
            .where(t.c.job_id == ids["d"])
            .values(state="dead", last_error="ValueError: d", created_at=now - timedelta(hours=2))
        )
        conn.execute(
            update(t)
            .where(t.c.job_id == ids["nested"])
            .values(available_at=now + timedelta(hours=1), attempts=3, last_error="broker refused")
        )
    return ids


def states(engine, outbox) -> dict[str, str]:
    return {row["job_id"]: row["state"] for row in outbox_rows(engine, outbox)}


def test_list_filters_by_state_task_and_age(capsys, db_args, staged):
    code, out, _ = run(capsys, "jobs", "list", "--json", *db_args)
    assert code == 0
    assert [r["job_id"] for r in json.loads(out)] == [staged[k] for k in ("a", "b", "c", "d", "nested")]

    _, out, _ = run(capsys, "jobs", "list", "--json", "--state", "dead", *db_args)
    assert [r["job_id"] for r in json.loads(out)] == [staged["c"], staged["d"]]
    _, out, _ = run(capsys, "jobs", "list", "--json", "--state", "dead", "--older-than", "3h", *db_args)
    assert [r["job_id"] for r in json.loads(out)] == [staged["c"]]
    _, out, _ = run(capsys, "jobs", "list", "--json", "--older-than", "90m", *db_args)
    assert [r["job_id"] for r in json.loads(out)] == [staged["c"], staged["d"]]
    _, out, _ = run(capsys, "jobs", "list", "--json", "--task", "tests.apps.celery_app.record", *db_args)
    assert [r["job_id"] for r in json.loads(out)] == [staged[k] for k in "abc"]
    _, out, _ = run(capsys, "jobs", "list", "--json", "--task", "*fail*", *db_args)
    assert [r["job_id"] for r in json.loads(out)] == [staged["d"], staged["nested"]]
    _, out, _ = run(capsys, "jobs", "list", "--json", "--task", "tests_apps%", *db_args)
    assert json.loads(out) == []  # % and _ are literal
    _, out, _ = run(capsys, "jobs", "list", "--json", "--limit", "2", *db_args)
    assert len(json.loads(out)) == 2

    code, out, _ = run(capsys, "jobs", "list", "--state", "dead", *db_args)
    lines = out.strip().splitlines()
    assert lines[0].split() == ["id", "state", "task", "queue", "age", "attempts", "error"]
    assert "ValueError: c" in lines[1] and " 10d " in lines[1]
    assert lines[-1] == "2 job(s)"


def test_show_decodes_a_json_message(capsys, db_args, staged, engine, outbox):
    """Nested kwargs and non-ASCII args, decoded; by task id or by row id; JSON and text."""
    code, out, _ = run(capsys, "jobs", "show", staged["nested"], "--json", *db_args)
    assert code == 0, out
    doc = json.loads(out)
    message = doc["message"]
    assert doc["task_name"] == "tests.apps.celery_app.fail_then_succeed"
    assert (doc["attempts"], doc["last_error"], doc["state"]) == (3, "broker refused", "pending")
    assert message["args"] == ["café ✓ 東京"]
    assert message["kwargs"] == {"failures": {"deep": ["ü", {"n": [1, 2.5, None, True]}]}, "countdown": 0}
    assert message["task"] == doc["task_name"] and message["task_id"] == staged["nested"]
    assert message["headers"]["id"] == staged["nested"] and message["body_note"] is None
    assert message["routing_key"] == "celery" and message["content_type"] == "application/json"

    code, text, _ = run(capsys, "jobs", "show", str(doc["id"]), *db_args)
    assert code == 0
    assert "café ✓ 東京" in text and '"deep": ["ü"' in text
    assert "publish attempts:" in text and "due to publish:" in text and "(in " in text
    assert "headers:" in text and "broker refused" in text

    code, _, err = run(capsys, "jobs", "show", "no-such-job", *db_args)
    assert code == 1 and "no job" in err


def test_show_never_unpickles(capsys, db_args, staged, engine, outbox, tmp_path, monkeypatch):
    """A pickle-serialized row is shown as opaque: its body would run code if unpickled."""
    from tests.apps.celery_app import record

    with Session(engine) as session:
        job_id = record.apply_async(("p",), serializer="pickle", reliable_job_session=session).id
        session.commit()
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with engine.begin() as conn:
        stored = conn.execute(select(outbox.c.message).where(outbox.c.job_id == job_id)).scalar_one()
        doc = json.loads(stored)
        doc["payload"]["body"] = base64.b64encode(evil).decode()
        conn.execute(update(outbox).where(outbox.c.job_id == job_id).values(message=json.dumps(doc)))

    def refuse(*_a, **_k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    code, out, _ = run(capsys, "jobs", "show", job_id, "--json", *db_args)
    assert code == 0
    message = json.loads(out)["message"]
    assert message["body_note"] == f"<pickle body, {len(evil)} bytes>"
    assert message["args"] is None and message["kwargs"] is None
    assert message["content_type"] == "application/x-python-serialize"
    _, text, _ = run(capsys, "jobs", "show", job_id, *db_args)
    assert "arguments:" in text and f"<pickle body, {len(evil)} bytes>" in text
    assert not marker.exists()


def test_retry_dead_with_filters_and_dry_run(capsys, db_args, staged, engine, outbox):
    before = outbox_rows(engine, outbox)
    code, out, _ = run(capsys, "jobs", "retry-dead", "--dry-run", *db_args)
    assert (code, out.strip()) == (0, "dry run: 2 dead job(s) back to pending (nothing changed)")
    assert outbox_rows(engine, outbox) == before

    code, out, err = run(capsys, "jobs", "retry-dead", "--older-than", "7d", "--batch-size", "1", *db_args)
    assert (code, out.strip()) == (0, "1 dead job(s) back to pending")
    assert err == ""  # not a terminal: no progress
    assert states(engine, outbox)[staged["c"]] == "pending"
    assert states(engine, outbox)[staged["d"]] == "dead"

    # the top-level alias takes the same filters; with IDs, only those rows
    code, out, _ = run(capsys, "retry-dead", staged["a"], staged["d"], *db_args)
    assert (code, out.strip()) == (0, "1 dead job(s) back to pending")
    assert count_rows(engine, outbox, state="dead") == 0


def test_purge_dead_only_unless_forced(capsys, db_args, staged, engine, outbox):
    code, out, _ = run(
        capsys, "jobs", "purge", "--state", "dead", "--older-than", "7d", "--dry-run", *db_args
    )
    assert (code, out.strip()) == (0, "dry run: 1 job(s) purged (nothing changed)")
    assert count_rows(engine, outbox) == 5

    code, _, err = run(capsys, "jobs", "purge", "--state", "pending", *db_args)
    assert code == 2 and "refusing to purge pending rows" in err and "--force" in err
    assert count_rows(engine, outbox) == 5

    code, out, _ = run(capsys, "jobs", "purge", "--older-than", "7d", *db_args)  # dead by default
    assert (code, out.strip()) == (0, "1 job(s) purged")
    assert staged["c"] not in states(engine, outbox)

    code, out, _ = run(capsys, "jobs", "purge", "--state", "pending", "--force", staged["a"], *db_args)
    assert (code, out.strip()) == (0, "1 job(s) purged")
    assert set(states(engine, outbox)) == {staged[k] for k in ("b", "d", "nested")}


def test_publish_now_moves_the_due_time(capsys, db_args, staged, engine, outbox):
    code, out, _ = run(capsys, "jobs", "publish-now", "--dry-run", *db_args)
    assert (code, out.strip()) == (0, "dry run: 1 waiting job(s) due now (nothing changed)")
    before = datetime.now(timezone.utc)
    code, out, _ = run(capsys, "jobs", "publish-now", staged["nested"], *db_args)
    assert (code, out.strip()) == (0, "1 waiting job(s) due now")
    row = {r["job_id"]: r for r in outbox_rows(engine, outbox)}[staged["nested"]]
    due = row["available_at"].replace(tzinfo=row["available_at"].tzinfo or timezone.utc)
    assert before - timedelta(seconds=5) <= due <= datetime.now(timezone.utc)
    assert (row["state"], row["attempts"]) == ("pending", 3)  # nothing else moved
    # and the relay's claim takes it now
    from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase
    from reliable_job.settings import Settings

    store = SQLAlchemyDatabase(Settings(database_url=db_args[1], table_name=db_args[3]))
    with store.claim(10) as claim:
        assert staged["nested"] in {r.job_id for r in claim.rows}
        claim.mark_sent([r.id for r in claim.rows])
    store.engine.dispose()


def test_progress_on_a_terminal(db_args, staged, database_url):
    """On a pty, stderr shows the progress; stdout (a pipe) gets the final count line."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reliable_job.cli", "jobs", "retry-dead", "--batch-size", "1", *db_args],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    out, _ = proc.communicate(timeout=60)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    assert out.strip() == "2 dead job(s) back to pending"
    assert "retry-dead: 1/2 rows" in err and "retry-dead: 2/2 rows" in err
