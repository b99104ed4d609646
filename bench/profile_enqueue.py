"""Where a staged ``.delay()`` spends its time and how many statements it sends: stage N jobs
(one per request transaction, as the enqueue figure does) on the SQLAlchemy or the Django path,
print µs per transaction (wall and CPU), the statements per job (pg_stat_statements, when
preloaded) and, with ``--profile``, cProfile's top functions.

With the services up (``make services-up && source .services.env``):
    .venv/bin/python -m bench.profile_enqueue [--path django|sqlalchemy] [--side staged|direct]
        [-n 2000] [--profile] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections.abc import Callable

from bench.common import Env, reset_outbox
from bench.dbcost import DbMeter


def _sqlalchemy(side: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    from bench import enqueue
    from bench.app import runtime

    enqueue.orders.metadata.create_all(runtime.database.engine)
    fn = enqueue._staged(1) if side == "staged" else enqueue._direct(1)

    def close() -> None:
        enqueue.orders.drop(runtime.database.engine)

    return fn, close


def _django(env: Env, side: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    from bench import django_path

    path = django_path.setup(env.redis_url)
    delay = [0.0]
    fn = path.staged(1, delay) if side == "staged" else path.direct(1, delay)
    return fn, path.close


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile_enqueue", description=__doc__)
    parser.add_argument("--path", choices=("django", "sqlalchemy"), default="django")
    parser.add_argument("--side", choices=("staged", "direct"), default="staged")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime")
    args = parser.parse_args(argv)
    env = Env.from_environ()
    os.environ.update(env.library_environ())
    from bench.app import runtime

    runtime.database.create_table()
    reset_outbox(env)
    fn, close = _django(env, args.side) if args.path == "django" else _sqlalchemy(args.side)
    meter = DbMeter(env)
    try:
        for i in range(50):  # warm up
            fn(i)
        before = meter.snapshot()
        profiler = cProfile.Profile() if args.profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        for i in range(args.n):
            fn(i)
        if profiler is not None:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cost = meter.cost(before, meter.snapshot(), top=8)
    finally:
        meter.close()
        close()
        runtime.database.table.drop(runtime.database.engine, checkfirst=True)
        env.redis().flushdb()
    print(
        f"{args.path} {args.side}: {wall / args.n * 1e6:.0f} µs/transaction wall, "
        f"{cpu / args.n * 1e6:.0f} µs CPU in this process; per job: {cost.per_job(args.n)}"
    )
    for row in cost.top:
        print(f"  {row['calls'] / args.n:6.3f}/job  {row['query']}")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
