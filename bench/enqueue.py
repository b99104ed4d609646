"""Figure 1, enqueue cost on PostgreSQL: a request-like transaction done two ways.

(a) ``direct``: insert one business row, COMMIT, then ``apply_async`` straight to Redis (the usual
    way, e.g. ``delay_on_commit``);
(b) ``staged``: insert the row, ``apply_async`` staged in the same transaction, COMMIT.

Blocks of (a) and (b) alternate (and swap order every round) so drift in machine load hits both;
the figure is the median per-transaction time over rounds. The same with 100 tasks per
transaction gives ``enqueue_ratio_100``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy.orm import Session

from bench.app import plain_noop, reliable_noop, runtime
from bench.common import ORDERS, Env, Sizes, median, reset_outbox

orders = Table(ORDERS, MetaData(), Column("id", Integer, primary_key=True), Column("v", String(20)))


def _direct(tasks: int) -> Callable[[int], None]:
    engine = runtime.database.engine

    def run(i: int) -> None:
        with Session(engine) as session:
            session.execute(insert(orders).values(v="order"))
            session.commit()
        for j in range(tasks):
            plain_noop.apply_async((i, j))

    return run


def _staged(tasks: int) -> Callable[[int], None]:
    engine = runtime.database.engine

    def run(i: int) -> None:
        with Session(engine) as session:
            session.execute(insert(orders).values(v="order"))
            for j in range(tasks):
                reliable_noop.apply_async((i, j), reliable_job_session=session)
            session.commit()

    return run


def _per_call_us(fn: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def _compare(env: Env, tasks: int, block: int, rounds: int) -> dict[str, Any]:
    direct, staged = _direct(tasks), _staged(tasks)
    _per_call_us(direct, max(5, block // 4))  # warm up: pools, prepared messages, caches
    _per_call_us(staged, max(5, block // 4))
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        reset_outbox(env)  # the outbox and the queue stay small: every round sees the same tables
        pair = [(direct, a), (staged, b)] if r % 2 == 0 else [(staged, b), (direct, a)]
        for fn, out in pair:
            out.append(_per_call_us(fn, block))
    return {
        "tasks_per_transaction": tasks,
        "transactions_per_block": block,
        "rounds": rounds,
        "direct_us": round(median(a), 1),
        "staged_us": round(median(b), 1),
        "direct_us_rounds": [round(x, 1) for x in a],
        "staged_us_rounds": [round(x, 1) for x in b],
        "ratio": round(median(b) / median(a), 3),
    }


def run(env: Env, sizes: Sizes) -> dict[str, Any]:
    orders.metadata.create_all(runtime.database.engine)
    try:
        one = _compare(env, 1, sizes.enqueue_block, sizes.enqueue_rounds)
        hundred = _compare(env, 100, sizes.enqueue_block_100, sizes.enqueue_rounds)
    finally:
        with runtime.database.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {ORDERS}"))
        reset_outbox(env)
    return {
        "enqueue_ratio": one["ratio"],
        "enqueue_ratio_100": hundred["ratio"],
        "detail": {"one_task": one, "hundred_tasks": hundred},
    }
