"""End to end: Prometheus metrics scraped from a real ``reliable-job relay --metrics-port`` and a
real ``celery worker`` with the ``metrics_port`` setting (prefork, multiprocess mode), and the
counters of a producer registered in its own registry."""

from __future__ import annotations

import sys
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from reliable_job.integrations.prometheus import register
from reliable_job.processes import free_port
from tests.conftest import count_rows, stage_records, wait_for

N = 40
COUNTERS = (
    "reliable_job_published_total",
    "reliable_job_publish_errors_total",
    "reliable_job_dead_total",
    "reliable_job_redelivered_total",
    "reliable_job_relay_passes_total",
    "reliable_job_staged_total",
    "reliable_job_completed_total",
)
GAUGES = (
    "reliable_job_relay_last_pass_timestamp_seconds",
    "reliable_job_outbox_rows",
    "reliable_job_oldest_pending_seconds",
    "reliable_job_oldest_sent_seconds",
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples(response.read().decode())


def value(scraped, name: str, **labels: str) -> float | None:
    return scraped.get((name, tuple(sorted(labels.items()))))


def scraped_when(port: int, check, message: str):
    """Scrape until ``check(scraped)`` holds; the last scrape."""
    last: dict = {}

    def ok() -> bool:
        nonlocal last
        try:
            last = scrape(port)
        except OSError:
            return False
        return bool(check(last))

    wait_for(ok, timeout=60, interval=0.2, message=f"{message}; last scrape: {last}")
    return last


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_relay_metrics_port(services, celery_app, engine, outbox, redis_url):
    """A relay process serves the relay counters and the outbox gauges; a producer's own registry
    counts what it staged, by task."""
    registry = CollectorRegistry()
    producer = register(registry)
    try:
        ids = stage_records(engine, "m", N)
    finally:
        producer.disconnect()
    mine = samples_of(registry)
    assert value(mine, "reliable_job_staged_total", task="tests.apps.celery_app.record") == N

    port = free_port()
    relay = services._start(
        "relay",
        [
            sys.executable,
            "-m",
            "reliable_job.cli",
            "relay",
            "--app",
            "tests.apps.celery_app:app",
            "--metrics-port",
            str(port),
            "--metrics-addr",
            "127.0.0.1",
        ],
    )
    wait_for(lambda: count_rows(engine, outbox, state="pending") == 0, timeout=60, message="all published")
    scraped = scraped_when(
        port, lambda s: value(s, "reliable_job_published_total") == N, f"published_total == {N}"
    )
    assert relay.poll() is None, services.log(relay)
    names = {name for name, _ in scraped}
    assert set(COUNTERS) - {"reliable_job_staged_total"} <= names, names
    assert set(GAUGES) <= names, names
    assert value(scraped, "reliable_job_publish_errors_total") == 0
    for reason in ("publish", "final_failure", "never_completed"):
        assert value(scraped, "reliable_job_dead_total", reason=reason) == 0
    assert value(scraped, "reliable_job_redelivered_total") == 0
    assert value(scraped, "reliable_job_relay_passes_total") >= 1
    assert value(scraped, "reliable_job_relay_pass_seconds_count") >= 1
    assert value(scraped, "reliable_job_relay_last_pass_timestamp_seconds") > 0
    assert value(scraped, "reliable_job_outbox_rows", state="pending") == 0
    assert value(scraped, "reliable_job_outbox_rows", state="sent") == N
    assert value(scraped, "reliable_job_outbox_rows", state="dead") == 0
    assert value(scraped, "reliable_job_oldest_pending_seconds") == 0
    assert value(scraped, "reliable_job_oldest_sent_seconds") >= 0
    assert value(scraped, "reliable_job_outbox_up") == 1
    assert len(ids) == N
    assert services.stop(relay) == 0


def samples_of(registry: CollectorRegistry):
    from prometheus_client import generate_latest

    return samples(generate_latest(registry).decode())


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_worker_metrics_port_prefork_multiprocess(services, celery_app, engine, outbox, tmp_path):
    """A prefork worker with ``metrics_port`` (and PROMETHEUS_MULTIPROC_DIR): its in-worker relay's
    counters and the completions counted in its pool's children, in one scrape."""
    port = free_port()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    worker = services.worker(
        concurrency=2,
        pool="prefork",
        RELIABLE_JOB_METRICS_PORT=str(port),
        RELIABLE_JOB_METRICS_ADDR="127.0.0.1",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    ids = stage_records(engine, "w", N)
    wait_for(lambda: set(services.runs()) >= set(ids), timeout=120, interval=0.5, message="every job ran")
    wait_for(lambda: count_rows(engine, outbox) == 0, timeout=60, interval=0.2, message="every row deleted")
    scraped = scraped_when(
        port,
        lambda s: (
            value(s, "reliable_job_completed_total", outcome="succeeded") == N
            and value(s, "reliable_job_published_total") == N
        ),
        f"completed_total{{succeeded}} == published_total == {N}",
    )
    assert worker.poll() is None, services.log(worker)
    assert value(scraped, "reliable_job_outbox_rows", state="sent") == 0
    assert value(scraped, "reliable_job_outbox_rows", state="pending") == 0
    assert value(scraped, "reliable_job_relay_passes_total") >= 1
    assert value(scraped, "reliable_job_relay_last_pass_timestamp_seconds") > 0
    assert value(scraped, "reliable_job_dead_total", reason="final_failure") == 0
    assert services.stop(worker) == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_worker_metrics_port_in_use_keeps_the_worker_running(services, celery_app, engine, outbox):
    """A ``metrics_port`` another process holds is one logged error: the worker still relays and
    runs its jobs (its metrics are not worth the jobs)."""
    import socket

    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        worker = services.worker(
            concurrency=1, RELIABLE_JOB_METRICS_PORT=str(port), RELIABLE_JOB_METRICS_ADDR="127.0.0.1"
        )
        ids = stage_records(engine, "busy", 3)
        wait_for(lambda: set(services.runs()) >= set(ids), timeout=120, interval=0.5, message="every job ran")
        wait_for(
            lambda: count_rows(engine, outbox) == 0, timeout=60, interval=0.2, message="every row deleted"
        )
        assert worker.poll() is None, services.log(worker)
        assert f"cannot serve metrics on 127.0.0.1:{port}" in services.log(worker)
    assert services.stop(worker) == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_job_published_rows_give_their_task_names(celery_app, engine, outbox):
    """A receiver of job_published reads the task name from each stored row."""
    from reliable_job.integrations.celery.decoding import task_name_of
    from tests.conftest import outbox_rows

    stage_records(engine, "t", 2)
    names = {task_name_of(str(row["message"])) for row in outbox_rows(engine, outbox)}
    assert names == {"tests.apps.celery_app.record"}
    assert task_name_of("not json") is None
