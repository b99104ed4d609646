"""The job tools on the in-memory fake: filters, batched changes with progress on a (fake)
terminal, the final count line, durations; the display decoder on hand-made messages."""

from __future__ import annotations

import argparse
import io
import time
from datetime import datetime, timedelta, timezone

import pytest

from reliable_job.cli import jobs as cli_jobs
from reliable_job.ports import JobAction, JobFilter, StagedJob
from reliable_job.schema import DEAD, PENDING
from reliable_job.testing import InMemoryStore


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def store_with(n_dead: int, n_pending: int = 1) -> InMemoryStore:
    store = InMemoryStore()
    store.write([StagedJob(f"d{i}", "shop.tasks.mail", "celery", "{}") for i in range(n_dead)])
    store.write([StagedJob(f"p{i}", "shop.other", "celery", "{}") for i in range(n_pending)])
    for r in store.rows.values():
        if r.job.job_id.startswith("d"):
            r.state = DEAD
    return store


def args(command: str, **kw: object) -> argparse.Namespace:
    defaults = dict(
        jobs_command=command,
        state=None,
        task=None,
        older_than=None,
        ids=[],
        dry_run=False,
        batch_size=2,
        force=False,
        limit=100,
        json=False,
    )
    return argparse.Namespace(**{**defaults, **kw})


def test_progress_on_a_terminal_and_the_final_line_always():
    store = store_with(5)
    out, err = io.StringIO(), FakeTty()
    assert cli_jobs.run_jobs(args("retry-dead"), store, out, err) == 0
    assert out.getvalue() == "5 dead job(s) back to pending\n"
    assert err.getvalue() == ("\rretry-dead: 2/5 rows\rretry-dead: 4/5 rows\rretry-dead: 5/5 rows\n")
    out, err = io.StringIO(), io.StringIO()  # not a terminal: no progress, the count line still
    assert cli_jobs.run_jobs(args("retry-dead"), store, out, err) == 0
    assert (out.getvalue(), err.getvalue()) == ("0 dead job(s) back to pending\n", "")


def test_dry_run_changes_nothing():
    store = store_with(3)
    out = io.StringIO()
    cli_jobs.run_jobs(args("purge", dry_run=True), store, out, io.StringIO())
    assert out.getvalue() == "dry run: 3 job(s) purged (nothing changed)\n"
    assert len(store.rows) == 4


def test_purge_refuses_live_rows_without_force():
    from reliable_job.errors import ReliableJobError

    store = store_with(1)
    with pytest.raises(ReliableJobError, match="refusing to purge pending rows"):
        cli_jobs.run_jobs(args("purge", state=["pending"]), store, io.StringIO(), io.StringIO())
    cli_jobs.run_jobs(args("purge", state=["pending"], force=True), store, io.StringIO(), io.StringIO())
    assert [r.state for r in store.rows.values()] == [DEAD]


def test_filters_on_the_fake():
    store = store_with(2, 2)
    old = next(iter(store.rows.values()))
    old.created_at = time.time() - 8 * 86400
    week_ago = datetime.now(timezone.utc) - timedelta(days=7)
    assert [r.job_id for r in store.find_jobs(JobFilter(created_before=week_ago))] == ["d0"]
    assert [r.job_id for r in store.find_jobs(JobFilter(task="shop.*.mail"))] == ["d0", "d1"]
    assert [r.job_id for r in store.find_jobs(JobFilter(states=(PENDING,)), limit=1)] == ["p0"]
    waiting = next(r for r in store.rows.values() if r.state == PENDING)
    waiting.available_at = time.time() + 3600
    assert store.count_jobs(JobFilter(waiting=True)) == 1
    assert store.change_jobs(JobAction.PUBLISH_NOW, JobFilter(waiting=True)) == 1
    assert waiting.available_at <= time.time()


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("15m", 900), ("3h", 10800), ("7d", 604800), ("2w", 1209600), ("42", 42)]
)
def test_durations(text, seconds):
    assert cli_jobs.parse_duration(text) == seconds
    with pytest.raises(argparse.ArgumentTypeError):
        cli_jobs.parse_duration("7 days")


def test_display_decodes_protocol_2_and_shows_others_as_opaque():
    import json

    from reliable_job.integrations.celery.display import describe_message
    from reliable_job.integrations.celery.message import CapturedPublish

    def stored(body: bytes, content_type: str) -> str:
        headers = {"task": "shop.tasks.mail", "id": "abc", "retries": 2}
        return CapturedPublish(
            body, content_type, "utf-8", headers, {}, "", "celery", declare=["celery"]
        ).to_json()

    view = describe_message(
        stored(json.dumps([["ü"], {"k": {"n": [1]}}, {"callbacks": None}]).encode(), "application/json")
    )
    assert (view.task, view.task_id, view.args, view.kwargs, view.retries) == (
        "shop.tasks.mail",
        "abc",
        ["ü"],
        {"k": {"n": [1]}},
        2,
    )
    assert view.call() == "mail('ü', k={'n': [1]})"
    view = describe_message(stored(b"\x80\x04evil", "application/x-python-serialize"))
    assert (view.args, view.body_note) == (None, "<pickle body, 6 bytes>")
    assert describe_message(stored(b"a: 1", "application/x-yaml")).body_note == "<yaml body, 4 bytes>"
    assert describe_message("not json").error is not None
