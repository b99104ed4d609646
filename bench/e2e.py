"""Figure 4, end to end: N no-op tasks through a real ``celery worker``, reliable vs plain.

One worker process for both variants: ``celery -A bench.app worker --pool prefork
--concurrency 2`` (two children, one per core of the reference machine), with the relay thread
running inside it (``relay_in_worker``, the default deployment) and completion deleting each row;
``--loglevel=WARNING`` so that per-task log lines do not dominate a no-op task.
Each job is enqueued the way a request would: insert a business row and

* plain: COMMIT, then ``apply_async`` straight to Redis;
* reliable: stage the job in the transaction, COMMIT (the worker's relay publishes it).

The clock runs from the first enqueue until the tasks' Redis counter reaches N; rounds alternate
(plain, reliable, reliable, plain, ...). ``e2e_ratio`` = the median over rounds of each round's
reliable / plain throughput.

On a small machine that clock is often bound by the producer (one enqueueing thread), so the
figure mostly repeats the enqueue cost. ``e2e_drain_ratio`` (extra, no target) isolates the
worker side: the backlog is ready before a fresh worker starts (plain: N messages in Redis;
reliable: N staged rows committed in the outbox, so the worker's relay publishes them while its
children run them and completion deletes the rows), and the clock runs from the first task run
to the last. Around each drain the database's cost is read (bench/dbcost.py): for the reliable
drain, the statements and WAL bytes per job relayed and completed
(``db_statements_per_job_relay_complete``, ``db_wal_bytes_per_job_relay_complete``); for the plain
one, what the idle relay thread costs meanwhile.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from bench.app import COUNTER, QUEUE, plain_noop, reliable_noop, runtime
from bench.common import (
    MONITOR,
    TABLE,
    Env,
    Sizes,
    load_rows,
    log,
    median,
    paired,
    ratio_keys,
    reset_outbox,
    running,
    spawn,
    wait_connected,
    wait_for,
    with_application_name,
)
from bench.dbcost import Cost, DbMeter, summary
from bench.enqueue import orders
from reliable_job.processes import Process


def _enqueue_plain(n: int) -> None:
    engine = runtime.database.engine
    for i in range(n):
        with Session(engine) as session:
            session.execute(insert(orders).values(v="order"))
            session.commit()
        plain_noop.apply_async((i,))


def _enqueue_reliable(n: int) -> None:
    engine = runtime.database.engine
    for i in range(n):
        with Session(engine) as session:
            session.execute(insert(orders).values(v="order"))
            reliable_noop.apply_async((i,), reliable_job_session=session)
            session.commit()


def _outbox_rows(env: Env) -> int:
    with env.pg() as conn:
        row = conn.execute(f"SELECT {MONITOR} count(*) FROM {TABLE}").fetchone()
    return int(row[0]) if row else 0


def _round(env: Env, variant: str, n: int) -> tuple[float, float]:
    """(jobs/s from the first enqueue until the last task ran, seconds spent enqueueing)."""
    client = env.redis()
    client.delete(COUNTER)
    start = time.perf_counter()
    (_enqueue_reliable if variant == "reliable" else _enqueue_plain)(n)
    enqueued = time.perf_counter() - start
    wait_for(
        lambda: int(client.get(COUNTER) or 0) >= n,
        timeout=n / 20 + 120,
        interval=0.01,
        message=f"{n} {variant} tasks to run",
    )
    seconds = time.perf_counter() - start
    # not timed: every row completed (deleted) before the next round
    wait_for(
        lambda: _outbox_rows(env) == 0, timeout=120, interval=0.01, message="completion to empty the outbox"
    )
    assert int(client.llen(QUEUE)) == 0
    client.close()
    return n / seconds, enqueued


def _worker(env: Env, sizes: Sizes, log_dir: Path, name: str) -> Process:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.app",
        "worker",
        "--pool",
        "prefork",
        f"--concurrency={sizes.e2e_concurrency}",
        "-Q",
        QUEUE,
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{name}@%h",
    ]
    return spawn(
        env,
        name,
        argv,
        log_dir,
        RELIABLE_JOB_RELAY_IN_WORKER="1",
        RELIABLE_JOB_DATABASE_URL=with_application_name(env.postgres_url, name),
    )


def _drain_round(
    env: Env, meter: DbMeter, sizes: Sizes, log_dir: Path, variant: str, n: int, name: str
) -> tuple[float, Cost]:
    """Jobs/s of a worker started on a ready backlog, from the first task run to the last, and the
    database's cost from the worker's start until completion has emptied the outbox."""
    reset_outbox(env)
    if variant == "reliable":  # staged messages, committed (see common.load_rows)
        with env.pg(autocommit=False) as conn:
            load_rows(conn, n)
            conn.commit()
    else:
        for i in range(n):
            plain_noop.apply_async((i, 0.0))
    client = env.redis()
    before = meter.snapshot()
    worker = _worker(env, sizes, log_dir, name)
    with running([worker]):
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + n / 20 + 120
        while True:
            done, now = int(client.get(COUNTER) or 0), time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done >= n:
                break
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{done} of {n} {variant} tasks ran:\n{worker.log()[-3000:]}")
            time.sleep(0.005)
        assert first is not None
        wait_for(
            lambda: _outbox_rows(env) == 0,
            timeout=120,
            interval=0.01,
            message="completion to empty the outbox",
        )
        cost = meter.cost(before, meter.snapshot(), top=8)
    client.close()
    return (n - first[1]) / max(now - first[0], 1e-6), cost


def _drain(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"plain": [], "reliable": []}
    costs: dict[str, list[Cost]] = {"plain": [], "reliable": []}
    meter = DbMeter(env)
    try:
        for r in range(sizes.e2e_rounds):
            order = ("plain", "reliable") if r % 2 == 0 else ("reliable", "plain")
            for variant in order:
                rate, cost = _drain_round(
                    env, meter, sizes, log_dir, variant, sizes.e2e_tasks, f"drain-{variant}-{r}"
                )
                rates[variant].append(rate)
                costs[variant].append(cost)
                log(
                    f"e2e drain: {variant} {rate:.0f} jobs/s; "
                    f"database: {cost.statements} statements, {cost.wal_bytes} WAL bytes"
                )
    finally:
        meter.close()
    plain, reliable = median(rates["plain"]), median(rates["reliable"])
    jobs = sizes.e2e_tasks * sizes.e2e_rounds
    db = {
        variant: {**summary(runs, jobs), "top_statements_last_round": runs[-1].top}
        for variant, runs in costs.items()
    }
    return {
        **ratio_keys("e2e_drain_ratio", paired(rates["reliable"], rates["plain"])),
        "plain_jobs_per_s": round(plain),
        "reliable_jobs_per_s": round(reliable),
        "plain_rounds": [round(x) for x in rates["plain"]],
        "reliable_rounds": [round(x) for x in rates["reliable"]],
        "db": db,
    }


def run(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    orders.metadata.create_all(runtime.database.engine)
    reset_outbox(env)
    worker = _worker(env, sizes, log_dir, "e2e-worker")
    rates: dict[str, list[float]] = {"plain": [], "reliable": []}
    enqueue_s: dict[str, list[float]] = {"plain": [], "reliable": []}
    try:
        with running([worker]):
            wait_connected(env, [worker])  # the relay thread connects once the pool is up
            _round(env, "plain", max(50, sizes.e2e_tasks // 20))  # warm up both paths
            _round(env, "reliable", max(50, sizes.e2e_tasks // 20))
            for r in range(sizes.e2e_rounds):
                order = ("plain", "reliable") if r % 2 == 0 else ("reliable", "plain")
                for variant in order:
                    rate, enqueued = _round(env, variant, sizes.e2e_tasks)
                    rates[variant].append(rate)
                    enqueue_s[variant].append(round(enqueued, 2))
                    log(f"e2e: {variant} {rate:.0f} jobs/s (enqueueing took {enqueued:.1f}s)")
        drain = _drain(env, sizes, log_dir)
    finally:
        orders.drop(runtime.database.engine, checkfirst=True)
        reset_outbox(env)
    plain, reliable = median(rates["plain"]), median(rates["reliable"])
    return {
        **ratio_keys("e2e_ratio", paired(rates["reliable"], rates["plain"])),
        **{k: v for k, v in drain.items() if k.startswith("e2e_drain_ratio")},
        "db_statements_per_job_relay_complete": drain["db"]["reliable"]["statements_per_job"],
        "db_wal_bytes_per_job_relay_complete": drain["db"]["reliable"]["wal_bytes_per_job"],
        "detail": {
            "drain": drain,
            "tasks": sizes.e2e_tasks,
            "pool": f"prefork, concurrency {sizes.e2e_concurrency}",
            "plain_jobs_per_s": round(plain),
            "reliable_jobs_per_s": round(reliable),
            "plain_rounds": [round(x) for x in rates["plain"]],
            "reliable_rounds": [round(x) for x in rates["reliable"]],
            "enqueue_seconds": enqueue_s,
        },
    }
