"""End to end: what ``celery inspect`` and Celery's event stream show of reliable-job in a real
``celery worker`` running the relay (docs/operating/celery-visibility.md).

- ``celery -A app inspect stats --json`` (a subprocess) holds the relay's figures under
  ``reliable_job``;
- ``celery -A app inspect reliable_job_status --json`` returns the outbox status;
- with ``task_send_sent_event`` on, a ``task-sent`` event reaches a real event receiver on Redis
  for each job the relay publishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone

import redis as redis_lib

from tests.conftest import ROOT, stage_records, wait_for

APP = "tests.apps.visibility_app"


def start_worker(services, node: str):
    """A ``celery worker`` of the visibility app (relay thread on, ``task_send_sent_event`` on)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        APP,
        "worker",
        "--loglevel=INFO",
        "--concurrency=2",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        node,
    ]
    proc = services._start("worker", argv, RELIABLE_JOB_RELAY_IN_WORKER="1")
    proc.wait_for_line(r"ready\.", timeout=60)
    return proc


def inspect(services, command: str, node: str) -> dict[str, object]:
    """``celery -A app inspect <command> --json -d <node>`` in a subprocess: the node's reply."""
    completed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "inspect", command, "--json", "-d", node, "-t", "10"],
        env=services.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    replies = json.loads(completed.stdout.strip().splitlines()[-1])
    assert node in replies, replies
    reply = replies[node]
    assert isinstance(reply, dict), reply
    return reply


def in_process_stats(app, node: str) -> dict[str, object]:
    """The worker's ``stats`` reply, asked from this process (for waiting; asserted via the CLI)."""
    replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
    reply = replies.get(node) or {}
    return dict(reply.get("reliable_job") or {})


def test_inspect_stats_and_status_show_the_relay_and_the_outbox(
    services, celery_app, engine, outbox, database_url
):
    node = f"vis{uuid.uuid4().hex[:6]}@localhost"
    worker = start_worker(services, node)
    ids = stage_records(engine, "vis-", 7)
    wait_for(lambda: set(services.runs()) >= set(ids), timeout=120, interval=0.3, message="7 jobs run")
    postgres = database_url.startswith("postgresql")
    wait_for(
        lambda: (
            (figures := in_process_stats(celery_app, node)).get("published") == 7
            and (figures["mode"] == "listening" or not postgres)
        ),
        timeout=60,
        interval=0.5,
        message="the relay's figures in stats",
    )

    stats = inspect(services, "stats", node)
    figures = stats["reliable_job"]
    assert isinstance(figures, dict), stats
    assert figures["published"] == 7
    assert figures["relays"] == 1
    assert figures["outage_since"] is None
    assert figures["mode"] == ("listening" if postgres else "polling")
    last_pass = datetime.fromisoformat(str(figures["last_pass"]))
    assert last_pass.tzinfo is not None and last_pass <= datetime.now(timezone.utc)
    assert "total" in stats and "pool" in stats, "Celery's own stats are all there"

    status = inspect(services, "reliable_job_status", node)
    assert {"pending", "sent", "dead", "oldest_pending_seconds"} <= set(status), status
    assert status["pending"] == 0 and status["dead"] == 0
    assert status["oldest_pending_seconds"] is None
    services.stop(worker)


class EventReceiver:
    """A real Celery event receiver on Redis, in a thread: the ``task-sent`` events it saw."""

    def __init__(self, app) -> None:
        self.app = app
        self.events: list[dict[str, object]] = []
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"task-sent": self.events.append})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self, redis_url: str) -> None:
        client = redis_lib.Redis.from_url(redis_url)
        try:
            before = subscriptions(client)
            self._thread.start()
            wait_for(lambda: subscriptions(client) > before, timeout=30, message="the receiver subscribed")
        finally:
            client.close()

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)


def subscriptions(client: redis_lib.Redis) -> int:
    return int(client.pubsub_numpat()) + len(client.pubsub_channels())


def test_the_relay_sends_task_sent_for_each_job_it_publishes(services, celery_app, engine, outbox, redis_url):
    """``task_send_sent_event`` on: staging sends no event (nothing reached the broker), the relay
    sends Celery's ``task-sent`` when it publishes the job, with Celery's fields."""
    receiver = EventReceiver(celery_app)
    receiver.start(redis_url)
    try:
        node = f"ev{uuid.uuid4().hex[:6]}@localhost"
        start_worker(services, node)
        ids = stage_records(engine, "ev-", 3)
        wait_for(
            lambda: {e["uuid"] for e in receiver.events} >= set(ids),
            timeout=60,
            interval=0.2,
            message="a task-sent event for each job",
        )
        wait_for(lambda: set(services.runs()) >= set(ids), timeout=120, interval=0.3, message="3 jobs run")
    finally:
        receiver.stop()
    by_id = {e["uuid"]: e for e in receiver.events if e["uuid"] in ids}
    assert len([e for e in receiver.events if e["uuid"] in ids]) == 3, "one event per job"
    event = by_id[ids[0]]
    assert event["type"] == "task-sent"
    assert event["pid"] != os.getpid(), "sent by the worker's relay, not at staging"
    assert event["name"] == "tests.apps.celery_app.record"
    assert event["args"] == "('ev-0',)"
    assert event["kwargs"] == "{}"
    assert event["retries"] == 0
    assert event["queue"] == "celery" and event["routing_key"] == "celery"
    assert event["root_id"] == ids[0] and event["parent_id"] is None
    assert event["eta"] is None and event["expires"] is None
