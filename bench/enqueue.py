"""Figure 1, enqueue cost on PostgreSQL: a request-like transaction done two ways.

(a) ``direct``: insert one business row, COMMIT, then ``apply_async`` straight to Redis (the usual
    way, e.g. ``delay_on_commit``);
(b) ``staged``: insert the row, ``apply_async`` staged in the same transaction, COMMIT.

Each round runs a block of (a) and a block of (b) back to back (the order swaps every round); the
figure is the median over rounds of that round's ratio (b) / (a), so a change in the machine's
load lands on both sides of a round's ratio. The same with 100 tasks per transaction gives
``enqueue_ratio_100``.

``enqueue_django_ratio`` is the same pairing on the Django path (bench/django_path.py):
``transaction.atomic()`` creating a model row, ``.delay()`` direct after the commit against staged
inside it. Its detail also pairs the time spent in ``.delay()`` alone (``delay_ratio``: staged
inside the transaction against the direct push to Redis).

Around every block the database's cost is read (bench/dbcost.py): statements and WAL bytes per
job, staged against direct, which do not depend on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy.orm import Session

from bench.app import plain_noop, reliable_noop, runtime
from bench.common import ORDERS, Env, Sizes, median, paired, reset_outbox
from bench.dbcost import Cost, DbMeter, summary

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


def _compare(
    env: Env,
    meter: DbMeter,
    tasks: int,
    block: int,
    rounds: int,
    sides: tuple[Callable[[int], None], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """Paired blocks of (a) and (b): ``sides`` (default: the SQLAlchemy path's)."""
    direct, staged = sides or (_direct(tasks), _staged(tasks))
    _per_call_us(direct, max(5, block // 4))  # warm up: pools, prepared messages, caches
    _per_call_us(staged, max(5, block // 4))
    a: list[float] = []
    b: list[float] = []
    costs: dict[str, list[Cost]] = {"direct": [], "staged": []}
    for r in range(rounds):
        reset_outbox(env)  # the outbox and the queue stay small: every round sees the same tables
        pair = [("direct", direct, a), ("staged", staged, b)]
        for name, fn, out in pair if r % 2 == 0 else reversed(pair):
            before = meter.snapshot()
            out.append(_per_call_us(fn, block))
            costs[name].append(meter.cost(before, meter.snapshot()))
    ratio = paired(b, a)
    jobs = block * rounds * tasks
    return {
        "tasks_per_transaction": tasks,
        "transactions_per_block": block,
        "rounds": rounds,
        "direct_us": round(median(a), 1),
        "staged_us": round(median(b), 1),
        "direct_us_rounds": [round(x, 1) for x in a],
        "staged_us_rounds": [round(x, 1) for x in b],
        "ratio": ratio["value"],
        "ratio_rounds": ratio["rounds"],
        "ratio_spread": ratio["spread"],
        "ratio_of_medians": round(median(b) / median(a), 3),
        "db": {"direct": summary(costs["direct"], jobs), "staged": summary(costs["staged"], jobs)},
    }


def _compare_django(env: Env, meter: DbMeter, block: int, rounds: int) -> dict[str, Any]:
    """The Django path, one task per transaction, with the time of ``.delay()`` alone paired too."""
    from bench import django_path

    path = django_path.setup(env.redis_url)
    try:
        direct_delay, staged_delay = [0.0], [0.0]
        direct, staged = path.direct(1, direct_delay), path.staged(1, staged_delay)
        delays: dict[str, list[float]] = {"direct": [], "staged": []}

        def timed(fn: Callable[[int], None], into: list[float], name: str) -> Callable[[int], None]:
            def run(i: int) -> None:  # each block's total .delay() time, read when it starts again
                if i == 0:
                    if into[0]:
                        delays[name].append(into[0] / block)
                    into[0] = 0.0
                fn(i)

            return run

        compared = _compare(
            env,
            meter,
            1,
            block,
            rounds,
            (timed(direct, direct_delay, "direct"), timed(staged, staged_delay, "staged")),
        )
        delays["direct"].append(direct_delay[0] / block)
        delays["staged"].append(staged_delay[0] / block)
    finally:
        path.close()
    # the first entry of each is the warm-up block's (a quarter block): dropped
    a, b = delays["direct"][1:], delays["staged"][1:]
    delay = paired(b, a)
    compared["delay"] = {
        "direct_us": round(median(a), 1),
        "staged_us": round(median(b), 1),
        "ratio": delay["value"],
        "ratio_rounds": delay["rounds"],
        "ratio_spread": delay["spread"],
    }
    return compared


def run(env: Env, sizes: Sizes) -> dict[str, Any]:
    orders.metadata.create_all(runtime.database.engine)
    meter = DbMeter(env)
    try:
        one = _compare(env, meter, 1, sizes.enqueue_block, sizes.enqueue_rounds)
        hundred = _compare(env, meter, 100, sizes.enqueue_block_100, sizes.enqueue_rounds)
        django = _compare_django(env, meter, sizes.enqueue_block, sizes.enqueue_rounds)
    finally:
        meter.close()
        with runtime.database.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {ORDERS}"))
        reset_outbox(env)
    db = one["db"]
    return {
        **_ratio_keys("enqueue_ratio", one),
        **_ratio_keys("enqueue_ratio_100", hundred),
        **_ratio_keys("enqueue_django_ratio", django),
        "enqueue_django_delay_ratio": django["delay"]["ratio"],
        "db_statements_per_job_direct": db["direct"]["statements_per_job"],
        "db_statements_per_job_staged": db["staged"]["statements_per_job"],
        "db_wal_bytes_per_job_direct": db["direct"]["wal_bytes_per_job"],
        "db_wal_bytes_per_job_staged": db["staged"]["wal_bytes_per_job"],
        "db_statements_per_job_django_staged": django["db"]["staged"]["statements_per_job"],
        "detail": {"one_task": one, "hundred_tasks": hundred, "django": django},
    }


def _ratio_keys(key: str, compared: dict[str, Any]) -> dict[str, Any]:
    return {
        key: compared["ratio"],
        f"{key}_rounds": compared["ratio_rounds"],
        f"{key}_spread": compared["ratio_spread"],
    }
