"""Shared pieces of the harness: sizes, service URLs, the outbox table, bulk loading, subprocesses."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

from reliable_job.processes import Process
from reliable_job.processes import wait_for as wait_for  # re-exported: the harness's modules use it
from reliable_job.schema import validate_table_name

ROOT = Path(__file__).resolve().parent.parent
TABLE = validate_table_name("bench_outbox")
LARGE_TABLE = validate_table_name("bench_outbox_large")
"""A second outbox (figure 5): the large backlog, measured side by side with the small one."""
TEMPLATES = validate_table_name("bench_templates")
ORDERS = validate_table_name("bench_orders")
REDIS_DB = 5
"""The benchmark's own Redis database: flushed freely, never the test suite's db 0."""
MONITOR = "/* bench:monitor */"
"""Marks the harness's own monitoring queries: the database's cost per job (bench/dbcost.py) leaves
out every statement whose text holds it."""


@dataclass(frozen=True)
class Sizes:
    quick: bool
    enqueue_rounds: int
    enqueue_block: int
    """Transactions per block; blocks of (a) and (b) alternate, ``enqueue_rounds`` times each."""
    enqueue_block_100: int
    relay_rows: int
    naive_rows: int
    relay_rounds: int
    """Rounds of raw, relay and naive drains, back to back: the relay ratios are per round."""
    latency_light_seconds: float
    latency_light_rate: float
    latency_heavy_seconds: float
    latency_heavy_producers: int
    e2e_tasks: int
    e2e_rounds: int
    e2e_concurrency: int
    claim_small: int
    claim_large: int
    claim_repetitions: int
    rss_rows: int
    """Rows of the large backlog the relay drains while its peak RSS is measured."""


FULL = Sizes(
    quick=False,
    enqueue_rounds=9,
    enqueue_block=200,
    enqueue_block_100=10,
    relay_rows=100_000,
    naive_rows=5_000,
    relay_rounds=3,
    latency_light_seconds=15,
    latency_light_rate=200,
    latency_heavy_seconds=10,
    latency_heavy_producers=2,
    e2e_tasks=5_000,
    e2e_rounds=2,
    e2e_concurrency=2,
    claim_small=10_000,
    claim_large=1_000_000,
    claim_repetitions=100,
    rss_rows=1_000_000,
)
QUICK = Sizes(
    quick=True,
    enqueue_rounds=5,
    enqueue_block=100,
    enqueue_block_100=5,
    relay_rows=20_000,
    naive_rows=2_000,
    relay_rounds=3,
    latency_light_seconds=5,
    latency_light_rate=200,
    latency_heavy_seconds=5,
    latency_heavy_producers=2,
    e2e_tasks=2_000,
    e2e_rounds=1,
    e2e_concurrency=2,
    claim_small=10_000,
    claim_large=200_000,
    claim_repetitions=50,
    rss_rows=100_000,
)


@dataclass(frozen=True)
class Env:
    """Where the services are (from ``scripts/services.sh``'s env file)."""

    postgres_url: str
    """SQLAlchemy URL (``postgresql+psycopg://...``)."""
    redis_url: str
    """The benchmark's Redis database (:data:`REDIS_DB`)."""

    @classmethod
    def from_environ(cls) -> Env:
        try:
            pg = os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"]
            server = os.environ["RELIABLE_JOB_TEST_REDIS_URL"].rsplit("/", 1)[0]
        except KeyError as exc:
            raise SystemExit(f"{exc} is not set: run `make bench` (or source a services env file)") from None
        return cls(pg, f"{server}/{REDIS_DB}")

    @property
    def conninfo(self) -> str:
        """The same database for psycopg (the raw baseline, bulk loading)."""
        return self.postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def library_environ(self) -> dict[str, str]:
        """What bench/app.py and the library read, in this process and in every subprocess."""
        return {
            "BENCH_BROKER_URL": self.redis_url,
            "RELIABLE_JOB_DATABASE_URL": self.postgres_url,
            "RELIABLE_JOB_TABLE_NAME": TABLE,
            "RELIABLE_JOB_RELAY_IN_WORKER": "0",
        }

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.library_environ())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def pg(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo, autocommit=autocommit)


_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, with seconds since the harness started."""
    print(f"bench [{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired(numerators: Sequence[float], denominators: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """A ratio measured as pairs: round ``i`` measured both sides back to back, so a change in the
    machine's load hits both sides of that round's ratio. The figure is the median of the
    per-round ratios, with every round and the spread (min, max)."""
    assert numerators and len(numerators) == len(denominators)
    ratios = [n / max(d, 1e-12) for n, d in zip(numerators, denominators, strict=True)]
    return {
        "value": round(median(ratios), digits),
        "rounds": [round(r, digits) for r in ratios],
        "spread": [round(min(ratios), digits), round(max(ratios), digits)],
    }


def ratio_keys(key: str, pair: dict[str, Any]) -> dict[str, Any]:
    """``key``, ``<key>_rounds``, ``<key>_spread`` from :func:`paired`."""
    return {key: pair["value"], f"{key}_rounds": pair["rounds"], f"{key}_spread": pair["spread"]}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


# -- the outbox table -------------------------------------------------------------------------------


def reset_outbox(env: Env) -> None:
    """A fresh, empty outbox table and an empty benchmark Redis database."""
    with env.pg() as conn:
        conn.execute(f"TRUNCATE {TABLE} RESTART IDENTITY")
    client = env.redis()
    client.flushdb()
    client.close()


def make_templates(env: Env, count: int = 100) -> None:
    """Stage ``count`` real jobs through the library, keep them as templates for bulk loading.

    Bulk-loaded rows are these exact messages with a fresh job id: what the relay reads is what
    staging writes."""
    from sqlalchemy.orm import Session

    from bench.app import reliable_noop, runtime

    reset_outbox(env)
    with Session(runtime.database.engine) as session:
        for i in range(count):
            reliable_noop.apply_async((i, 0.0), reliable_job_session=session)
        session.commit()
    with env.pg() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TEMPLATES}")
        conn.execute(
            f"CREATE TABLE {TEMPLATES} AS SELECT (row_number() OVER (ORDER BY id)) - 1 AS k, "
            f"job_id, task_name, queue, message FROM {TABLE}"
        )
    reset_outbox(env)


def load_rows(conn: psycopg.Connection[Any], rows: int, table: str = TABLE) -> None:
    """Insert ``rows`` pending rows (copies of the templates, each with a fresh job id) and ANALYZE,
    in ``conn``'s current transaction: the caller commits."""
    table = validate_table_name(table)
    count = conn.execute(f"SELECT count(*) FROM {TEMPLATES}").fetchone()
    assert count is not None and count[0] > 0, "make_templates() first"
    conn.execute(
        f"INSERT INTO {table} (job_id, task_name, queue, message, created_at, updated_at) "
        f"SELECT s.u, t.task_name, t.queue, replace(t.message, t.job_id, s.u), now(), now() "
        f"FROM (SELECT g, gen_random_uuid()::text AS u FROM generate_series(1, %s) AS g) AS s "
        f"JOIN {TEMPLATES} AS t ON t.k = s.g %% %s ORDER BY s.g",
        (rows, count[0]),
    )
    conn.execute(f"ANALYZE {table}")


def pending(env: Env) -> int:
    with env.pg() as conn:
        row = conn.execute(f"SELECT {MONITOR} count(*) FROM {TABLE} WHERE state = 'pending'").fetchone()
    return int(row[0]) if row else 0


# -- subprocesses ---------------------------------------------------------------------------------


def spawn(env: Env, name: str, argv: list[str], log_dir: Path, **extra: str) -> Process:
    """``argv`` with the harness's environment, its output in ``log_dir/<name>.log``."""
    return Process(argv, log_dir / f"{name}.log", env=env.subprocess_env(**extra), cwd=ROOT, name=name)


def with_application_name(url: str, name: str) -> str:
    """``url`` with libpq's ``application_name``: pg_stat_activity then tells whose session is whose."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def relay_process(env: Env, name: str, log_dir: Path, **extra: str) -> Process:
    """A production relay: ``reliable-job relay --app bench.app:app`` with the default settings."""
    argv = [str(Path(sys.executable).with_name("reliable-job")), "relay", "--app", "bench.app:app"]
    if not Path(argv[0]).exists():
        argv = [sys.executable, "-m", "reliable_job.cli", "relay", "--app", "bench.app:app"]
    extra.setdefault("RELIABLE_JOB_DATABASE_URL", with_application_name(env.postgres_url, name))
    return spawn(env, name, argv, log_dir, **extra)


def has_connected(env: Env, name: str) -> bool:
    """Whether the process started as ``name`` has opened its database session: a relay connects
    the broker, then the database, for its first claim (the engine connects lazily)."""
    with env.pg() as conn:
        row = conn.execute(
            f"SELECT {MONITOR} count(*) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        ).fetchone()
    return bool(row and row[0])


def wait_connected(env: Env, children: Sequence[Process]) -> None:
    """Until every relay (or worker) process has a session on the database: its relay is running.

    Named by ``application_name`` (see :func:`with_application_name`), not by the text of its last
    query: between polls a session shows ``COMMIT`` or a pool ping, not the claim."""

    def ready() -> bool:
        for child in children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.log()[-3000:]}")
        return all(has_connected(env, child.name) for child in children)

    wait_for(ready, timeout=90, interval=0.05, message="relays to connect to the database")


@contextmanager
def running(children: Sequence[Process]) -> Iterator[None]:
    """Stop (SIGTERM, SIGKILL after 60 s) every child on the way out."""
    try:
        yield
    finally:
        for child in children:
            child.stop(timeout=60)


def as_dict(sizes: Sizes) -> dict[str, Any]:
    return asdict(sizes)
