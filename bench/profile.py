"""Where the relay's time goes: drain a backlog with the library's relay in this process
(``runtime.relay()``, ``run_once`` until empty), first plain (jobs/s), then under cProfile.

With the services up (``make services-up && source .services.env``):
    .venv/bin/python -m bench.profile [--rows 20000] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

from bench.common import Env, load_rows, reset_outbox


def drain(env: Env, rows: int, profiler: cProfile.Profile | None = None) -> float:
    from bench.app import runtime

    reset_outbox(env)
    with env.pg(autocommit=False) as conn:
        load_rows(conn, rows)
        conn.commit()
    relay = runtime.relay()
    relay.run_once()  # connect the broker and the pool outside the measurement
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    while relay.run_once():
        pass
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - start
    relay.broker.close()
    return rows / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    args = parser.parse_args(argv)
    env = Env.from_environ()
    os.environ.update(env.library_environ())
    from bench.app import runtime
    from bench.common import make_templates

    runtime.database.create_table()
    make_templates(env)
    try:
        rate = drain(env, args.rows)
        profiler = cProfile.Profile()
        profiled = drain(env, args.rows, profiler)
    finally:
        runtime.database.table.drop(runtime.database.engine, checkfirst=True)
        env.redis().flushdb()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(args.sort).print_stats(args.top)
    print(
        f"in-process relay: {rate:.0f} jobs/s ({profiled:.0f} jobs/s under cProfile), "
        f"{args.rows} rows, batch size {runtime.settings.batch_size}"
    )
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
