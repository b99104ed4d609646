"""Figure 5, backlog scale.

* ``claim_scale_ratio``: median time of one claim (the library's own ``runtime.database.claim``,
  ``batch_size`` rows, then rolled back so the same backlog is measured every time) with
  ``claim_large`` pending rows / with ``claim_small``. Both after ``VACUUM ANALYZE``.
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
from bench.common import TABLE, Env, Sizes, load_rows, median, relay_process, reset_outbox, wait_polling


class _Rollback(Exception):
    pass


def _claim_ms(repetitions: int) -> tuple[float, int]:
    """Median ms of claim + rollback, and the rows each claim held."""
    db = runtime.database
    limit = runtime.settings.batch_size
    held = 0
    times = []
    for i in range(repetitions + 5):
        start = time.perf_counter()
        try:
            with db.claim(limit) as claim:
                held = len(claim.rows)
                raise _Rollback
        except _Rollback:
            pass
        if i >= 5:  # the first few warm the pool and the caches
            times.append((time.perf_counter() - start) * 1000)
    return median(times), held


def _vacuum(env: Env) -> None:
    with env.pg() as conn:
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")


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
    reset_outbox(env)
    with env.pg(autocommit=False) as conn:
        load_rows(conn, sizes.claim_small)
        conn.commit()
    _vacuum(env)
    small_ms, small_held = _claim_ms(sizes.claim_repetitions)
    started = time.perf_counter()
    with env.pg(autocommit=False) as conn:
        load_rows(conn, sizes.claim_large - sizes.claim_small)
        conn.commit()
    _vacuum(env)
    load_seconds = time.perf_counter() - started
    large_ms, large_held = _claim_ms(sizes.claim_repetitions)

    relay = relay_process(env, "rss-relay", log_dir)
    target = sizes.rss_rows
    try:
        with Janitor(env) as janitor:
            wait_polling(env, [relay])
            start = time.perf_counter()
            deadline = time.monotonic() + target / 200 + 120
            while janitor.removed < target:
                if not relay.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"relay drained only {janitor.removed} of {target} rows:\n"
                                       f"{relay.text()[-3000:]}")
                time.sleep(0.1)
            seconds = time.perf_counter() - start
            status, rss_mb = relay.stop_with_rusage()
    finally:
        relay.stop()
        reset_outbox(env)
    if status != 0:
        raise RuntimeError(f"relay exited with {status}:\n{relay.text()[-3000:]}")
    return {
        "claim_scale_ratio": round(large_ms / small_ms, 3),
        "relay_rss_mb": round(rss_mb, 1),
        "detail": {
            "claim_small_rows": sizes.claim_small,
            "claim_large_rows": sizes.claim_large,
            "claim_small_ms": round(small_ms, 3),
            "claim_large_ms": round(large_ms, 3),
            "claimed_per_claim": [small_held, large_held],
            "claim_repetitions": sizes.claim_repetitions,
            "bulk_load_seconds": round(load_seconds, 1),
            "rss_drained_rows": target,
            "rss_backlog_rows": sizes.claim_large,
            "rss_drain_jobs_per_s": round(target / seconds),
        },
    }
