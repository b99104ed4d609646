"""Shared fixtures: real PostgreSQL, SQLite, Redis, celery worker and relay processes.

``make test`` starts PostgreSQL and Redis and sets ``RELIABLE_JOB_TEST_*`` (see
``scripts/services.sh``). With ``RELIABLE_JOB_TEST_REQUIRE_SERVICES=1`` (always under
``make test``) a test whose service is missing fails; otherwise it is skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import Engine, MetaData, Table, func, select, text

from reliable_job.integrations.sqlalchemy import create_outbox_engine, outbox_table
from reliable_job.processes import Process
from reliable_job.processes import free_port as free_port  # re-exported for the tests
from reliable_job.processes import wait_for as wait_for

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = os.environ.get("RELIABLE_JOB_TEST_REQUIRE_SERVICES") == "1"


def need(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        message = f"{variable} is not set: run the suite with `make test`"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    return value


# -- markers: what a test needs, from the fixtures it uses ----------------------------------------
#
# Applied here, not by hand, so that no test can forget them; read from fixtures (and fixture
# parameters), never from file paths, so moving files between directories changes nothing.
# ``postgres`` and ``redis`` say which servers a test needs. Every test also gets exactly one tier:
# ``e2e`` (real celery worker / relay processes), else ``integration`` (a real database or Redis),
# else ``unit``. ``pytest -m "not e2e"`` is the quick loop, ``-m unit`` needs no services at all.

MARKERS_BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "services": ("e2e", "redis"),
    "postgres_url": ("postgres",),
    "redis_url": ("redis",),
    "redis_server": ("redis",),
}
MARKERS_BY_PARAM: dict[tuple[str, object], tuple[str, ...]] = {
    ("database_url", "postgresql"): ("postgres",),
    ("store", "postgresql"): ("postgres",),  # test_store_contract's backends
}
REAL_DATABASE_FIXTURES = frozenset({"database_url", "engine"})
"""A real database, if only a SQLite file: an ``integration`` test even without any server."""
REAL_DATABASE_PARAMS = frozenset({("store", "sqlite")})


def mark_by_fixtures(
    item: pytest.Item,
    by_fixture: Mapping[str, tuple[str, ...]],
    by_param: Mapping[tuple[str, object], tuple[str, ...]] | None = None,
) -> None:
    """Add the markers the tables give each fixture (or fixture parameter) ``item`` uses."""
    wanted = [m for name in _fixtures(item) for m in by_fixture.get(name, ())]
    wanted += [m for key in _params(item) for m in (by_param or {}).get(key, ())]
    for marker in dict.fromkeys(wanted):
        if item.get_closest_marker(marker) is None:
            item.add_marker(marker)


def _fixtures(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ()))


def _params(item: pytest.Item) -> set[tuple[str, object]]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    return {(name, value) for name, value in callspec.params.items() if isinstance(value, (str, int))}


def _tier(item: pytest.Item) -> str:
    if item.get_closest_marker("e2e"):
        return "e2e"
    if (
        item.get_closest_marker("postgres")
        or item.get_closest_marker("redis")
        or _fixtures(item) & REAL_DATABASE_FIXTURES
        or _params(item) & REAL_DATABASE_PARAMS
    ):
        return "integration"
    return "unit"


def pytest_itemcollected(item: pytest.Item) -> None:
    # Per item, as it is collected (tests/django/conftest.py adds its own the same way): every
    # marker is in place before pytest_collection_modifyitems, whatever the order of conftests.
    mark_by_fixtures(item, MARKERS_BY_FIXTURE, MARKERS_BY_PARAM)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(tier)


# -- databases ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every database-backed test runs on both SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    return need("RELIABLE_JOB_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url() -> str:
    return need("RELIABLE_JOB_TEST_POSTGRES_URL")


@pytest.fixture
def table_name() -> str:
    """A fresh outbox table per test, so tests never see each other's rows."""
    return f"outbox_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_outbox_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def outbox(engine: Engine, table_name: str) -> Iterator[Table]:
    table = outbox_table(MetaData(), table_name)
    table.metadata.create_all(engine)
    yield table
    table.metadata.drop_all(engine)


def count_rows(engine: Engine, table: Table, **where: object) -> int:
    stmt = select(func.count()).select_from(table)
    for key, value in where.items():
        stmt = stmt.where(table.c[key] == value)
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


# -- redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared test Redis, flushed before the test."""
    url = need("RELIABLE_JOB_TEST_REDIS_URL")
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


@dataclass
class RedisServer:
    """A Redis server of the test's own, which the test may stop and start again (same port)."""

    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = Process(argv, self.directory / f"redis-{self.port}.log", name="redis-server")
        client = redis_lib.Redis(port=self.port)
        try:
            self.process.wait_until(lambda: _ping(client), timeout=10, message="redis to start")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.port)


def _ping(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = os.environ.get("RELIABLE_JOB_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        need("RELIABLE_JOB_TEST_REDIS_SERVER")
    server = RedisServer(str(binary), tmp_path)
    server.start()
    yield server
    server.stop()


# -- processes: celery workers and standalone relays ---------------------------------------------


@dataclass
class Services:
    """Runs the test Celery app (tests/apps/celery_app.py) in real processes."""

    broker_url: str
    database_url: str
    table_name: str
    executions: Table
    engine: Engine
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RJ_TEST_BROKER_URL=self.broker_url,
            RELIABLE_JOB_DATABASE_URL=self.database_url,
            RELIABLE_JOB_TABLE_NAME=self.table_name,
            RJ_TEST_EXECUTIONS=self.executions.name,
            RELIABLE_JOB_POLL_INTERVAL="0.05",
            RELIABLE_JOB_BACKOFF_CAP="1.0",
            PYTHONPATH=str(ROOT),
            # SIGABRT then dumps every thread's stack (stop(): a process that hangs on SIGTERM)
            PYTHONFAULTHANDLER="1",
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _start(self, name: str, argv: list[str], **extra: str) -> Process:
        path = self.log_dir / f"{name}-{len(self.processes)}.log"
        proc = Process(argv, path, env=self.env(**extra), cwd=ROOT, name=name)
        self.processes.append(proc)
        return proc

    def worker(
        self, *, relay: bool = True, concurrency: int = 2, pool: str | None = None, **extra: str
    ) -> Process:
        """A ``celery worker`` (with its relay thread unless ``relay=False``), once it is ready."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.celery_app",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={concurrency}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"w{uuid.uuid4().hex[:6]}@%h",
        ]
        if pool is not None:
            argv.append(f"--pool={pool}")
        proc = self._start("worker", argv, RELIABLE_JOB_RELAY_IN_WORKER="1" if relay else "0", **extra)
        proc.wait_for_line(r"ready\.", timeout=60)
        return proc

    def relay(self, **extra: str) -> Process:
        """A ``reliable-job relay`` process, just started (not waited for)."""
        argv = [sys.executable, "-m", "reliable_job.cli", "relay", "--app", "tests.apps.celery_app:app"]
        return self._start("relay", argv, **extra)

    def stop(self, proc: Process, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """``sig``, then its exit status; still running after ``timeout``: killed, and an error
        (after SIGABRT first: faulthandler, on in every process the tests start, writes each
        thread's stack to the log, even from a process stuck in a C call or at interpreter exit)."""
        return proc.stop(sig, timeout, strict=True, dump_signal=signal.SIGABRT)

    def log(self, proc: Process) -> str:
        return proc.log()

    def executed(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(self.executions.c.task_id, self.executions.c.marker, self.executions.c.attempt)
            ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def runs(self) -> Counter[str]:
        """How many times each task id ran."""
        return Counter(task_id for task_id, _, _ in self.executed())

    def markers(self) -> list[str]:
        return [marker for _, marker, _ in self.executed()]

    def close(self) -> None:
        for proc in self.processes:
            proc.close()


@pytest.fixture
def services(
    database_url: str, table_name: str, engine: Engine, outbox: Table, redis_url: str, tmp_path: Path
) -> Iterator[Services]:
    """Worker and relay processes on this test's database, outbox table and Redis."""
    from tests.apps import celery_app

    executions = celery_app.executions.to_metadata(MetaData(), name=f"exec_{table_name}")
    executions.metadata.create_all(engine)
    svc = Services(redis_url, database_url, table_name, executions, engine, tmp_path)
    yield svc
    svc.close()
    executions.metadata.drop_all(engine)


@pytest.fixture
def celery_app(
    database_url: str, table_name: str, redis_url: str, outbox: Table, monkeypatch: pytest.MonkeyPatch
):
    """The test app in this process, reconfigured for this test's database, table and Redis."""
    app, runtime = install_test_app(database_url, table_name, redis_url)
    yield app
    runtime.database.engine.dispose()


def install_test_app(database_url: str | None, table_name: str, redis_url: str, **settings: object):
    """The test app (tests/apps/celery_app.py) in this process on this database (or the
    ``engine=`` in ``settings``), outbox table and Redis, with reliable-job installed with
    ``settings``: ``(app, runtime)``."""
    from reliable_job.integrations.celery import install
    from tests.apps import celery_app as module

    module.app.conf.broker_url = redis_url
    module.app._pool = None  # new broker URL: new connection and producer pools
    module.app.amqp._producer_pool = None
    if database_url is not None:
        settings["database_url"] = database_url
    runtime = install(module.app, table_name=table_name, **settings)
    return module.app, runtime


def stage_records(engine: Engine, prefix: str, count: int) -> list[str]:
    """Stage ``count`` ``record`` jobs in one committed transaction; return their task ids."""
    from sqlalchemy.orm import Session

    from tests.apps.celery_app import record

    with Session(engine) as session:
        ids = [record.apply_async((f"{prefix}{i}",), reliable_job_session=session).id for i in range(count)]
        session.commit()
    return ids


def outbox_rows(engine: Engine, outbox: Table) -> list[dict[str, object]]:
    """Every outbox row as a dict, in claim order."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(outbox).order_by(outbox.c.id))]


def sql(engine: Engine, statement: str) -> list[tuple[object, ...]]:
    with engine.begin() as conn:
        result = conn.execute(text(statement))
        return [tuple(r) for r in result] if result.returns_rows else []
