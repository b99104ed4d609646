"""preserve_dead_jobs with a real worker, and the management commands: ``status [--json]``,
``retry-dead`` (in-process and as ``manage.py`` subprocesses) and ``relay`` (drains the outbox,
exits 0 on SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from io import StringIO

import pytest
import redis as redis_lib
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import wait_for
from tests.django.conftest import ALL_DATABASES, EXAMPLE, env, executed, flush_redis, outbox

pytestmark = [pytest.mark.django_db(transaction=True, databases=ALL_DATABASES), pytest.mark.e2e]


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def states(alias: str = "default") -> list[str]:
    return [state for _, state, _ in outbox(alias)]


def test_preserve_dead_jobs_keeps_the_row_dead_then_retry_dead(processes, django_db_setup):
    """With preserve_dead_jobs a final failure leaves the row dead with its error; success still
    deletes; status reports it; retry-dead puts it back to pending and it is delivered again."""
    from tests.django.testapp.tasks import always_fail, record

    flush_redis()
    worker = processes.worker(RELIABLE_JOB_PRESERVE_DEAD_JOBS="1")
    failed = always_fail.delay("dead")
    record.delay("ok")
    wait_for(lambda: states() == ["dead"], message="the failed job's row dead")
    from reliable_job.integrations.django.models import OutboxJob

    row = OutboxJob.objects.get()
    assert (row.job_id, row.last_error) == (failed.id, "ValueError: boom dead")
    assert sorted(executed()) == ["dead", "ok"]

    status = manage("reliable_job", "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout.strip().splitlines()[-1])
    assert {k: doc[k] for k in ("pending", "sent", "dead")} == {"pending": 0, "sent": 0, "dead": 1}
    assert doc["oldest_pending_seconds"] is None

    retried = manage("reliable_job", "retry-dead")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == "1 dead job(s) back to pending"
    wait_for(lambda: executed("dead") == ["dead", "dead"], message="the retried job to run again")
    wait_for(lambda: states() == ["dead"], message="dead again")
    assert processes.stop(worker) == 0, processes.log(worker)


def test_status_and_retry_dead_in_process_per_database():
    from tests.django.testapp.tasks import record, record_other

    record.delay("a")
    record_other.delay("b")
    from reliable_job.integrations.django.models import OutboxJob

    OutboxJob.objects.using("other").update(state="dead", last_error="x")
    out = StringIO()
    call_command("reliable_job", "status", "--json", stdout=out)
    doc = json.loads(out.getvalue())
    assert (doc["pending"], doc["sent"], doc["dead"]) == (1, 0, 1)
    assert doc["oldest_pending_seconds"] >= 0
    out = StringIO()
    call_command("reliable_job", "status", "--database", "default", stdout=out)
    assert out.getvalue().splitlines()[:3] == ["pending: 1", "sent (awaiting completion): 0", "dead: 0"]
    out = StringIO()
    call_command("reliable_job", "retry-dead", "--database", "default", stdout=out)
    assert out.getvalue().strip() == "0 dead job(s) back to pending"
    out = StringIO()
    call_command("reliable_job", "retry-dead", stdout=out)
    assert out.getvalue().strip() == "1 dead job(s) back to pending"
    assert states("other") == ["pending"]
    with pytest.raises(CommandError, match="alias"):
        call_command("reliable_job", "status", "--database", "nope")


def test_relay_command_drains_every_outbox_and_exits_on_sigterm(processes):
    """``manage.py reliable_job relay`` publishes the committed jobs of every database (one relay
    per alias) and exits 0 on SIGTERM."""
    from tests.django.testapp.tasks import record, record_other, record_sqlite

    flush_redis()
    ids = {record.delay(f"r{i}").id for i in range(5)}
    ids.add(record_other.delay("other").id)
    ids.add(record_sqlite.delay("sqlite").id)
    relay = processes.manage("reliable_job", "relay")
    client = redis_lib.Redis.from_url(os.environ["RELIABLE_JOB_TEST_REDIS_URL"])
    wait_for(lambda: client.llen("celery") == 7, message="7 messages on the broker")
    wait_for(
        lambda: states() == ["sent"] * 5 and states("other") == states("sqlite") == ["sent"],
        message="rows marked sent",
    )
    published = {json.loads(m)["headers"]["id"] for m in client.lrange("celery", 0, -1)}
    assert published == ids
    assert processes.stop(relay, signal.SIGTERM) == 0, processes.log(relay)
    assert "relay stopped" in processes.log(relay)
    client.close()


def test_complete_many_deletes_across_every_database():
    """Batched completion on Django: the ids do not say which alias holds their rows, so every
    alias's outbox is tried; each listed row goes, others stay."""
    from proj.celery import app

    from tests.django.testapp.tasks import record, record_other, record_sqlite

    flush_redis()
    done = [record.delay("a").id, record_other.delay("b").id, record_sqlite.delay("c").id]
    kept = record.delay("kept").id
    assert app.reliable_job.database.complete_many([*done, "no-such-job"]) == 3
    assert [job_id for _, _, job_id in outbox()] == [kept]
    assert outbox("other") == [] and outbox("sqlite") == []
