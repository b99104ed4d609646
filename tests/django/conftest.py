"""Django tests: the example project (``examples/django_project``) with the settings of
``tests/django/settings.py``, on real PostgreSQL (two databases), SQLite, Redis and real
``celery -A proj worker`` processes.

Django is configured here, when this directory is collected, without leaving
``DJANGO_SETTINGS_MODULE`` in the environment: the other tests' Celery apps and worker processes
never see Django.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib

from reliable_job.processes import Process
from tests.conftest import REQUIRE, ROOT, mark_by_fixtures

EXAMPLE = ROOT / "examples" / "django_project"
SETTINGS = "tests.django.settings"
_NEEDED = ("RELIABLE_JOB_TEST_POSTGRES_URL", "RELIABLE_JOB_TEST_REDIS_URL")

missing = [name for name in _NEEDED if not os.environ.get(name)]
if missing:
    if REQUIRE:
        raise pytest.UsageError(f"{', '.join(missing)} not set: run the suite with `make test`")
    collect_ignore_glob = ["test_*.py"]
else:
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    os.environ.setdefault("RJ_DJ_SQLITE", str(Path(tempfile.mkdtemp(prefix="rj-django-")) / "outbox.sqlite3"))
    _previous = os.environ.get("DJANGO_SETTINGS_MODULE")
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS  # proj.celery's app gets Celery's Django fixup
    try:
        import django

        django.setup()
    finally:
        if _previous is None:
            del os.environ["DJANGO_SETTINGS_MODULE"]
        else:
            os.environ["DJANGO_SETTINGS_MODULE"] = _previous


ALL_DATABASES = ["default", "other", "sqlite"]

MARKERS_BY_FIXTURE = {
    "processes": ("e2e",),
    # autouse here and only here: every test of the Django suite runs on PostgreSQL and Redis
    "_close_outbox_engines": ("postgres", "redis"),
}


def pytest_itemcollected(item: pytest.Item) -> None:
    """Markers from fixtures, like tests/conftest.py's (which then adds each test's tier)."""
    mark_by_fixtures(item, MARKERS_BY_FIXTURE)


def env(**extra: str) -> dict[str, str]:
    """Environment of a subprocess of the example project with the test settings."""
    values = dict(os.environ)
    values.update(
        DJANGO_SETTINGS_MODULE=SETTINGS,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(EXAMPLE)]),
        RELIABLE_JOB_BACKOFF_CAP="1.0",
    )
    values.update(extra)
    return values


@dataclass
class Processes:
    """``celery -A proj worker`` and ``manage.py`` processes of the example project."""

    log_dir: Path
    processes: list[Process] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], **extra: str) -> Process:
        path = self.log_dir / f"{name}-{len(self.processes)}.log"
        proc = Process(argv, path, env=env(**extra), cwd=EXAMPLE, name=name)
        self.processes.append(proc)
        return proc

    def worker(self, **extra: str) -> Process:
        """A ``celery -A proj worker``, once it is ready."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "worker",
            "--loglevel=INFO",
            "--concurrency=2",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"dj{uuid.uuid4().hex[:6]}@%h",
        ]
        proc = self.spawn("worker", argv, **extra)
        proc.wait_for_line(r"ready\.", timeout=90)
        return proc

    def manage(self, *args: str, **extra: str) -> Process:
        return self.spawn("manage", [sys.executable, "manage.py", *args], **extra)

    def stop(self, proc: Process, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """``sig``, then its exit status; still running after ``timeout``: killed, and an error."""
        return proc.stop(sig, timeout, strict=True)

    def log(self, proc: Process) -> str:
        return proc.log()

    def close(self) -> None:
        for proc in self.processes:
            proc.close()


def flush_redis() -> None:
    client = redis_lib.Redis.from_url(os.environ["RELIABLE_JOB_TEST_REDIS_URL"])
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("django-processes"))
    yield procs
    procs.close()


def executed(marker: str | None = None) -> list[str]:
    """Markers of the test tasks that ran (in the default database)."""
    from tests.django.testapp.models import Execution

    rows = Execution.objects.using("default").order_by("id")
    if marker is not None:
        rows = rows.filter(marker=marker)
    return list(rows.values_list("marker", flat=True))


def outbox(alias: str = "default") -> list[tuple[str, str, str]]:
    """``(task_name, state, job_id)`` of every outbox row of ``alias``."""
    from reliable_job.integrations.django.models import OutboxJob

    return list(OutboxJob.objects.using(alias).order_by("id").values_list("task_name", "state", "job_id"))


@pytest.fixture(scope="session", autouse=True)
def _close_outbox_engines(django_db_setup, django_db_blocker) -> Iterator[None]:
    """Close the relay-side engines before pytest-django drops the test databases."""
    yield
    from proj.celery import app

    app.reliable_job.database.dispose()
