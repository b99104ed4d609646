"""Figure 5, backlog scale.

* ``claim_scale_ratio``: median time of one claim (the library's own ``database.claim``,
  ``batch_size`` rows, then rolled back so the same backlog is measured every time) in an outbox of
  ``claim_large`` pending rows / in one of ``claim_small``. The two outboxes exist side by side
  (the large one is a second ``install`` with its own table name), both after ``VACUUM ANALYZE``,
  and blocks of 10 claims alternate between them. Each pair of blocks is a round: the figure is
  the median over rounds of (median claim of the large block / median claim of the small one).
* ``relay_rss_mb``: peak RSS (``ru_maxrss`` from ``os.wait4``) of a ``reliable-job relay`` process
  draining the large backlog (``rss_rows`` of it in a quick run). A janitor empties the Redis
  queue as it fills (atomic LLEN + DEL), so Redis memory stays flat and the count is exact.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bench.app import QUEUE, runtime
from bench.common import (
    LARGE_TABLE,
    TABLE,
    Env,
    Sizes,
    load_rows,
    log,
    median,
    paired,
    ratio_keys,
    relay_process,
    reset_outbox,
    wait_connected,
)
from reliable_job.schema import validate_table_name


class _Rollback(Exception):
    pass


def _claim_ms(database: Any, limit: int) -> tuple[float, int]:
    """ms of one claim + rollback through ``database`` (the library's store), rows it held."""
    held = 0
    start = time.perf_counter()
    try:
        with database.claim(limit) as claim:
            held = len(claim.rows)
            raise _Rollback
    except _Rollback:
        pass
    return (time.perf_counter() - start) * 1000, held


def _compare_claims(small: Any, large: Any, limit: int, repetitions: int) -> dict[str, Any]:
    """Blocks of 10 claims on each outbox, back to back (order swapped every round) so that drift
    in the machine's load hits both sides of a round; the ratio of each round's block medians."""
    times: dict[str, list[float]] = {"small": [], "large": []}
    blocks: dict[str, list[float]] = {"small": [], "large": []}
    held: dict[str, int] = {}
    for db in (small, large):  # warm the pools and the caches
        for _ in range(5):
            _claim_ms(db, limit)
    for r in range(max(1, repetitions // 10)):
        pair = [("small", small), ("large", large)]
        for name, db in pair if r % 2 == 0 else reversed(pair):
            block = []
            for _ in range(10):
                ms, held[name] = _claim_ms(db, limit)
                block.append(ms)
            times[name].extend(block)
            blocks[name].append(median(block))
    return {
        "small_ms": median(times["small"]),
        "large_ms": median(times["large"]),
        "ratio": paired(blocks["large"], blocks["small"]),
        "held": [held["small"], held["large"]],
    }


def _vacuum(env: Env, table: str) -> None:
    with env.pg() as conn:
        conn.execute(f"VACUUM (ANALYZE) {validate_table_name(table)}")


class Janitor:
    """Empties the queue every ``interval`` seconds, counting what it removed."""

    def __init__(self, env: Env, interval: float = 0.25) -> None:
        self.client = env.redis()
        self.interval = interval
        self.removed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sweep(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(QUEUE)
        pipe.delete(QUEUE)
        length, _ = pipe.execute()
        self.removed += int(length)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sweep()

    def __enter__(self) -> Janitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sweep()
        self.client.close()


def run(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    from celery import Celery

    from reliable_job.integrations.celery import install

    reset_outbox(env)
    # the large backlog in an outbox of its own, through the library's public install()
    large = install(
        Celery("bench-large", broker=env.redis_url), table_name=LARGE_TABLE, relay_in_worker=False
    )
    large.database.create_table()
    try:
        return _run(env, sizes, log_dir, large.database)
    finally:
        large.database.table.drop(large.database.engine, checkfirst=True)
        large.database.engine.dispose()


def _run(env: Env, sizes: Sizes, log_dir: Path, large: Any) -> dict[str, Any]:
    with env.pg(autocommit=False) as conn:
        load_rows(conn, sizes.claim_small)
        conn.commit()
    started = time.perf_counter()
    with env.pg(autocommit=False) as conn:
        load_rows(conn, sizes.claim_large, LARGE_TABLE)
        conn.commit()
    load_seconds = time.perf_counter() - started
    _vacuum(env, TABLE)
    _vacuum(env, LARGE_TABLE)
    claims = _compare_claims(runtime.database, large, runtime.settings.batch_size, sizes.claim_repetitions)
    small_ms, large_ms = claims["small_ms"], claims["large_ms"]
    log(
        f"backlog: claim {small_ms:.2f} ms ({sizes.claim_small} pending), "
        f"{large_ms:.2f} ms ({sizes.claim_large} pending)"
    )

    relay = relay_process(env, "rss-relay", log_dir, RELIABLE_JOB_TABLE_NAME=LARGE_TABLE)
    target = sizes.rss_rows
    try:
        with Janitor(env) as janitor:
            wait_connected(env, [relay])
            start = time.perf_counter()
            deadline = time.monotonic() + target / 200 + 120
            while janitor.removed < target:
                if not relay.alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"relay drained only {janitor.removed} of {target} rows:\n{relay.log()[-3000:]}"
                    )
                time.sleep(0.1)
            seconds = time.perf_counter() - start
            status = relay.stop(timeout=60)  # reaped with its rusage: peak_rss_mib
            rss_mb = relay.peak_rss_mib
    finally:
        relay.stop()
        reset_outbox(env)
    if status != 0:
        raise RuntimeError(f"relay exited with {status}:\n{relay.log()[-3000:]}")
    return {
        **ratio_keys("claim_scale_ratio", claims["ratio"]),
        "relay_rss_mb": round(rss_mb, 1),
        "detail": {
            "claim_small_rows": sizes.claim_small,
            "claim_large_rows": sizes.claim_large,
            "claim_small_ms": round(small_ms, 3),
            "claim_large_ms": round(large_ms, 3),
            "claimed_per_claim": claims["held"],
            "claim_repetitions": sizes.claim_repetitions,
            "bulk_load_seconds": round(load_seconds, 1),
            "rss_drained_rows": target,
            "rss_backlog_rows": sizes.claim_large,
            "rss_drain_jobs_per_s": round(target / seconds),
        },
    }
