"""A first look at reliable-job's two costs, each as a ratio against a baseline of the same run.

1. Enqueue: a request-like transaction (insert one row, enqueue one task, commit), done the usual
   way (commit, then a direct ``delay``) and with the task staged inside the transaction.
2. Relay: rows drained from the outbox into Redis by one relay, in jobs/s.

Needs the test services: ``make services-up && source .services.env``, then
``.venv/bin/python bench/first_look.py``. The full harness is ``make bench`` (issue 4).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import redis
from celery import Celery
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy.orm import Session

import reliable_job
from reliable_job.integrations.celery import install

POSTGRES = os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"]
REDIS = os.environ["RELIABLE_JOB_TEST_REDIS_URL"].rsplit("/", 1)[0] + "/7"

app = Celery("bench", broker=REDIS)
app.conf.task_ignore_result = True
runtime = install(app, database_url=POSTGRES, table_name="bench_outbox", relay_in_worker=False)
engine = runtime.database.engine
orders = Table("bench_orders", MetaData(), Column("id", Integer, primary_key=True),
               Column("v", String(20)))


@app.task(reliable_job=True)
def staged(x: int) -> None: ...


@app.task
def plain(x: int) -> None: ...


def per_call_us(n: int, fn: Callable[[int], None]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def commit_then_publish(i: int) -> None:
    with Session(engine) as session:
        session.execute(insert(orders).values(v="x"))
        session.commit()
    plain.delay(i)


def stage_in_transaction(i: int) -> None:
    with Session(engine) as session:
        session.execute(insert(orders).values(v="x"))
        staged.apply_async((i,), reliable_job_session=session)
        session.commit()


def relay_jobs_per_s(rows: int) -> float:
    with Session(engine) as session, reliable_job.bind(session):
        for i in range(rows):
            staged.delay(i)
        session.commit()
    relay = runtime.relay()
    start = time.perf_counter()
    while relay.run_once():
        pass
    seconds = time.perf_counter() - start
    relay.broker.close()
    return rows / seconds


def main() -> None:
    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    runtime.database.create_table()
    orders.metadata.create_all(engine)
    try:
        for fn in (commit_then_publish, stage_in_transaction):
            per_call_us(100, fn)  # warm up
        direct, staged_ = [], []
        for _ in range(3):
            direct.append(per_call_us(500, commit_then_publish))
            staged_.append(per_call_us(500, stage_in_transaction))
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM bench_outbox"))
        client.flushdb()
        rate = relay_jobs_per_s(20_000)
        result = {
            "enqueue_direct_us": round(statistics.median(direct)),
            "enqueue_staged_us": round(statistics.median(staged_)),
            "enqueue_ratio": round(statistics.median(staged_) / statistics.median(direct), 2),
            "relay_jobs_per_s": round(rate),
            "in_redis": client.llen("celery"),
        }
        print(json.dumps(result))
    finally:
        runtime.database.table.drop(engine)
        orders.drop(engine)
        client.flushdb()
        client.close()


if __name__ == "__main__":
    main()
