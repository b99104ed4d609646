"""Job tools in Django: the admin shows decoded arguments (opaque for pickle, never unpickled), its
actions (retry dead, publish now, purge dead) work on PostgreSQL and SQLite whatever ``USE_TZ``
and ``TIME_ZONE``, its age column is right in a zone west of UTC; ``manage.py reliable_job jobs``
runs the same commands as ``reliable-job jobs``."""

from __future__ import annotations

import base64
import html
import json
import pickle
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings
from sqlalchemy import select, update

from tests.django.conftest import ALL_DATABASES, EXAMPLE, env, flush_redis, outbox

pytestmark = pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)

URL = "/admin/reliable_job/outboxjob/"
WEST = "America/Los_Angeles"


def store(alias: str = "default"):
    from proj.celery import app

    return app.reliable_job.database.store(alias)


def set_row(job_id: str, alias: str = "default", **values) -> None:
    """Change a row through the relay's store (UTC times, whatever Django's settings)."""
    s = store(alias)
    with s.engine.begin() as conn:
        conn.execute(update(s.table).where(s.table.c.job_id == job_id).values(**values))


def row(job_id: str, alias: str = "default") -> dict:
    s = store(alias)
    with s.engine.connect() as conn:
        return dict(conn.execute(select(s.table).where(s.table.c.job_id == job_id)).one()._mapping)


@pytest.fixture
def jobs():
    """On ``default``: nested kwargs (pending), non-ASCII args (dead), one waiting on a backoff."""
    from tests.django.testapp.tasks import always_fail, record

    flush_redis()
    ids = {
        "nested": record.apply_async(kwargs={"marker": {"deep": ["ü", {"n": [1, 2.5, None]}]}}).id,
        "dead": always_fail.delay("café ✓ 東京").id,
        "waiting": record.delay("w").id,
    }
    now = datetime.now(timezone.utc)
    set_row(ids["dead"], state="dead", attempts=5, last_error="ValueError: boom")
    set_row(ids["waiting"], available_at=now + timedelta(hours=1), attempts=2)
    return ids


def pk(job_id: str, alias: str = "default") -> int:
    return int(row(job_id, alias)["id"])


def test_change_view_shows_decoded_arguments(admin_client, jobs):
    text = admin_client.get(f"{URL}{pk(jobs['nested'])}/change/").content.decode()
    assert html.escape('"deep": [\n    "ü"', quote=True) in text or "&quot;deep&quot;: [" in text
    assert "ü" in text and "2.5" in text
    assert "tests.django.testapp.tasks.record" in text and jobs["nested"] in text
    assert "Arguments (decoded)" in text and "routing key &#x27;celery&#x27;" in text

    text = admin_client.get(f"{URL}{pk(jobs['dead'])}/change/").content.decode()
    assert "café ✓ 東京" in text
    listing = admin_client.get(URL).content.decode()
    assert ">Call<" in listing
    assert "always_fail(&#x27;café ✓ 東京&#x27;)" in listing


def test_change_view_shows_a_pickle_body_as_opaque(admin_client, jobs, tmp_path, monkeypatch):
    from tests.django.testapp.tasks import record

    job_id = record.apply_async(("p",), serializer="pickle").id
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    doc = json.loads(row(job_id)["message"])
    doc["payload"]["body"] = base64.b64encode(evil).decode()
    set_row(job_id, message=json.dumps(doc))

    def refuse(*_a, **_k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    text = admin_client.get(f"{URL}{pk(job_id)}/change/").content.decode()
    assert f"&lt;pickle body, {len(evil)} bytes&gt;" in text
    assert f"record(&lt;pickle body, {len(evil)} bytes&gt;)" in admin_client.get(URL).content.decode()
    assert not marker.exists()


@pytest.mark.parametrize("use_tz", [False, True], ids=["use_tz_false", "use_tz_true"])
@pytest.mark.parametrize("alias", ["default", "sqlite"])
def test_actions_and_age_whatever_the_time_zone(admin_client, alias, use_tz):
    """Retry dead, publish now and purge dead through the admin, on PostgreSQL and SQLite, with
    ``USE_TZ`` either way and ``TIME_ZONE`` west of UTC; the age column reads 3h for a row staged
    three hours ago."""
    from tests.django.testapp.tasks import record, record_sqlite

    flush_redis()
    task = record if alias == "default" else record_sqlite
    store(alias).status()  # the relay's engine first (SQLite: WAL set up)
    ids = [task.delay(f"{alias}-{i}").id for i in range(4)]
    now = datetime.now(timezone.utc)
    set_row(ids[0], alias, state="dead", last_error="boom", created_at=now - timedelta(hours=3, minutes=5))
    set_row(ids[1], alias, state="dead", last_error="boom")
    set_row(ids[2], alias, available_at=now + timedelta(hours=1))
    pks = [pk(i, alias) for i in ids]
    config = {"database": alias, "poll_interval": 0.05, "backoff_cap": 1.0}
    with override_settings(USE_TZ=use_tz, TIME_ZONE=WEST, RELIABLE_JOB=config):
        listing = admin_client.get(URL, {"state__exact": "dead"}).content.decode()
        assert '<td class="field-age">3h</td>' in listing

        response = admin_client.post(
            URL, {"action": "retry_dead", "_selected_action": pks[:2] + pks[3:]}, follow=True
        )
        assert "2 dead job(s) back to pending." in response.content.decode()
        response = admin_client.post(URL, {"action": "publish_now", "_selected_action": pks}, follow=True)
        assert "1 waiting job(s) due now." in response.content.decode()
        set_row(ids[1], alias, state="dead")
        response = admin_client.post(URL, {"action": "purge_dead", "_selected_action": pks[:2]}, follow=True)
        assert "1 dead job(s) purged. 1 selected job(s) not dead were kept." in response.content.decode()
    after = datetime.now(timezone.utc)
    assert [job_id for _, _, job_id in outbox(alias)] == [ids[0], ids[2], ids[3]]
    assert {state for _, state, _ in outbox(alias)} == {"pending"}
    retried = row(ids[0], alias)
    updated = retried["updated_at"].replace(tzinfo=retried["updated_at"].tzinfo or timezone.utc)
    assert now - timedelta(seconds=5) <= updated <= after + timedelta(seconds=5)  # UTC, not shifted
    due = row(ids[2], alias)["available_at"]
    assert due.replace(tzinfo=due.tzinfo or timezone.utc) <= after
    from proj.celery import app

    app.reliable_job.database.complete_many(ids)


def test_manage_py_jobs_commands(jobs):
    """``manage.py reliable_job jobs``: list, show, publish-now, retry-dead, purge (in process)."""

    def manage(*args: str) -> str:
        out = StringIO()
        call_command("reliable_job", "jobs", *args, stdout=out, stderr=StringIO())
        return out.getvalue()

    listed = json.loads(manage("list", "--json", "--database", "default"))
    assert [r["job_id"] for r in listed] == [jobs["nested"], jobs["dead"], jobs["waiting"]]
    assert {r["database"] for r in listed} == {"default"}
    assert [r["job_id"] for r in json.loads(manage("list", "--json", "--state", "dead"))] == [jobs["dead"]]

    shown = json.loads(manage("show", jobs["nested"], "--json"))
    assert shown["message"]["kwargs"] == {"marker": {"deep": ["ü", {"n": [1, 2.5, None]}]}}
    assert "café ✓ 東京" in manage("show", jobs["dead"])

    assert manage("publish-now", "--dry-run").strip() == "dry run: 1 waiting job(s) due now (nothing changed)"
    assert manage("publish-now").strip() == "1 waiting job(s) due now"
    assert (
        manage("retry-dead", "--dry-run").strip()
        == "dry run: 1 dead job(s) back to pending (nothing changed)"
    )
    set_row(jobs["nested"], state="dead")
    assert manage("purge", "--state", "dead", jobs["nested"]).strip() == "1 job(s) purged"
    assert manage("retry-dead").strip() == "1 dead job(s) back to pending"
    assert sorted(job_id for _, _, job_id in outbox()) == sorted([jobs["dead"], jobs["waiting"]])


def test_manage_py_jobs_as_a_subprocess(jobs):
    """The same command run as ``manage.py``: purge refuses pending rows without --force."""
    out = subprocess.run(
        [sys.executable, "manage.py", "reliable_job", "jobs", "purge", "--state", "pending"],
        cwd=EXAMPLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "refusing to purge pending rows" in out.stderr
    assert len(outbox()) == 3
    listed = subprocess.run(
        [sys.executable, "manage.py", "reliable_job", "jobs", "list", "--state", "dead"],
        cwd=EXAMPLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip().splitlines()[-1] == "1 job(s)"
    assert "" not in listed.stdout.strip().splitlines()  # no blank line after each row


def test_reliable_job_dash_a_starts_django(jobs, tmp_path):
    """``reliable-job -A proj`` and ``celery -A proj reliable-job`` in a Django project start Django
    (as ``celery worker`` does), so they read the project's outbox databases, not the default
    ``sqlite:///reliable_job.sqlite3`` (which they created as a stray file in the project)."""
    for argv in (
        [sys.executable, "-m", "reliable_job.cli", "-A", "proj", "jobs", "list", "--json", "--state", "dead"],
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "reliable-job",
            "jobs",
            "list",
            "--json",
            "--state",
            "dead",
        ],
    ):
        out = subprocess.run(argv, cwd=EXAMPLE, env=env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert [(r["job_id"], r["database"]) for r in listed] == [(jobs["dead"], "default")]
    assert not (EXAMPLE / "reliable_job.sqlite3").exists()
