"""Scrape time of the outbox gauges (``reliable_job.integrations.prometheus.OutboxCollector``).

* ``metrics_scrape_ms_1m``: median ms of one scrape of a registry holding only the outbox
  collector (one ``status()`` of the outbox: rows by state, oldest pending, oldest sent, and the
  text exposition), on an outbox of ``claim_large`` rows (1M in a full run, 200k in a quick one:
  ``detail.rows`` says which), 90% pending, 9% sent, 1% dead, after ``VACUUM ANALYZE``. The
  outbox is a table of its own, made through the library's public ``install()``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Env, Sizes, load_rows, log, median
from reliable_job.schema import validate_table_name

SCRAPE_TABLE = validate_table_name("bench_outbox_scrape")
REPETITIONS = 30


def run(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    from celery import Celery
    from prometheus_client import CollectorRegistry, generate_latest

    from reliable_job.integrations.celery import install
    from reliable_job.integrations.prometheus import OutboxCollector

    outbox = install(
        Celery("bench-scrape", broker=env.redis_url), table_name=SCRAPE_TABLE, relay_in_worker=False
    )
    database = outbox.database
    database.create_table()
    try:
        rows = sizes.claim_large
        with env.pg(autocommit=False) as conn:
            load_rows(conn, rows, SCRAPE_TABLE)
            conn.execute(
                f"UPDATE {SCRAPE_TABLE} SET state = 'sent', sent_at = now() WHERE id % 100 BETWEEN 1 AND 9"
            )
            conn.execute(f"UPDATE {SCRAPE_TABLE} SET state = 'dead' WHERE id % 100 = 0")
            conn.commit()
        with env.pg() as conn:
            conn.execute(f"VACUUM (ANALYZE) {SCRAPE_TABLE}")
        registry = CollectorRegistry()
        registry.register(OutboxCollector(database))
        for _ in range(3):  # warm the pool and the caches
            generate_latest(registry)
        times = []
        for _ in range(REPETITIONS):
            start = time.perf_counter()
            text = generate_latest(registry)
            times.append((time.perf_counter() - start) * 1000)
        assert b'reliable_job_outbox_rows{state="pending"}' in text, text
        scrape_ms = median(times)
        log(f"scrape: outbox gauges in {scrape_ms:.1f} ms ({rows} rows)")
        return {
            "metrics_scrape_ms_1m": round(scrape_ms, 2),
            "detail": {"rows": rows, "repetitions": REPETITIONS, "min_ms": min(times), "max_ms": max(times)},
        }
    finally:
        database.table.drop(database.engine, checkfirst=True)
        database.engine.dispose()
