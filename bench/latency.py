"""Figure 3, commit-to-broker latency: time from a staged job's COMMIT to its message in Redis.

A production relay (``reliable-job relay --app bench.app:app``, default settings) runs while
producers stage one job per transaction and record when COMMIT returned (wall clock), keyed by a
sequence number carried in the task's arguments. A consumer process BRPOPs the queue and stamps
each message on arrival; latency = arrival - commit.

* light: one producer at a steady ``latency_light_rate`` jobs/s (the first second is warm-up and
  not counted): ``latency_p50_ms``, ``latency_p99_ms``;
* heavy: ``latency_heavy_producers`` processes committing as fast as they can.
"""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from bench.app import QUEUE
from bench.common import Env, Sizes, log, percentile, relay_process, reset_outbox, running, wait_connected

SEQ_STRIDE = 10_000_000
"""Producer ``p`` numbers its jobs from ``p * SEQ_STRIDE``."""


def _stage(seq: int) -> float:
    from sqlalchemy.orm import Session

    from bench.app import reliable_noop, runtime

    with Session(runtime.database.engine) as session:
        reliable_noop.apply_async((seq, time.time()), reliable_job_session=session)
        session.commit()
    return time.time()


def _produce_steady(warm: int, count: int, rate: float) -> dict[int, float]:
    """``warm + count`` jobs at ``rate``; the first ``warm`` get negative numbers (not counted)."""
    committed: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(warm + count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        committed[i - warm] = _stage(i - warm)
    return committed


def _produce_flat_out(producer: int, seconds: float, out: Any) -> None:
    """Child process: stage jobs one per transaction for ``seconds``, as fast as possible."""
    committed: dict[int, float] = {}
    committed[-1 - producer] = _stage(-1 - producer)  # warm-up: negative numbers are not counted
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        seq = producer * SEQ_STRIDE + i
        committed[seq] = _stage(seq)
        i += 1
    out.put(committed)


def _consume(redis_url: str, ready: Any, stop: Any, received: Synchronized[int], out: Any) -> None:
    """Child process: BRPOP until told to stop; sends back (sequence number, arrival time) pairs."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.ping()
    raw: list[tuple[float, bytes]] = []
    ready.set()
    while not stop.is_set():
        item = client.brpop([QUEUE], timeout=0.2)
        if item is None:
            continue
        raw.append((time.time(), item[1]))
        received.value += 1
    arrivals = []
    for at, payload in raw:
        envelope = json.loads(payload)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        arrivals.append((int(args[0]), at))
    out.put(arrivals)
    client.close()


def _measure(env: Env, produce: Any) -> dict[str, Any]:
    """Run ``produce()`` (returns {seq: commit time}) against a running relay and the consumer."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    received = ctx.Value("q", 0, lock=False)
    out = ctx.Queue()
    consumer = ctx.Process(target=_consume, args=(env.redis_url, ready, stop, received, out))
    consumer.start()
    if not ready.wait(60):
        raise RuntimeError("the consumer process did not start")
    log("latency: consumer started, producing")
    started = time.perf_counter()
    committed: dict[int, float] = produce(ctx)
    produced_seconds = time.perf_counter() - started
    log(f"latency: {len(committed)} jobs committed in {produced_seconds:.1f}s")
    deadline = time.monotonic() + 60
    while received.value < len(committed):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if received.value < len(committed):
        log(f"latency: only {received.value} of {len(committed)} received")
    stop.set()
    arrivals = dict(out.get(timeout=120))
    consumer.join(timeout=30)
    latencies = [(arrivals[s] - t) * 1000 for s, t in committed.items() if s >= 0 and s in arrivals]
    missing = sum(1 for s in committed if s >= 0 and s not in arrivals)
    if missing:
        raise RuntimeError(f"{missing} committed jobs never reached Redis")
    return {
        "jobs": len(latencies),
        "commit_rate_per_s": round(len(committed) / produced_seconds),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
    }


def run(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    reset_outbox(env)
    relay = relay_process(env, "latency-relay", log_dir)
    with running([relay]):
        wait_connected(env, [relay])
        rate = sizes.latency_light_rate
        warm = int(rate)  # one second of warm-up

        def light(_ctx: Any) -> dict[int, float]:
            return _produce_steady(warm, int(rate * sizes.latency_light_seconds), rate)

        def heavy(ctx: Any) -> dict[int, float]:
            out = ctx.Queue()
            procs = [
                ctx.Process(target=_produce_flat_out, args=(p, sizes.latency_heavy_seconds, out))
                for p in range(sizes.latency_heavy_producers)
            ]
            for p in procs:
                p.start()
            committed: dict[int, float] = {}
            for _ in procs:
                committed.update(out.get(timeout=sizes.latency_heavy_seconds + 120))
            for p in procs:
                p.join(timeout=30)
            return committed

        light_result = _measure(env, light)
        reset_outbox(env)
        heavy_result = _measure(env, heavy)
        heavy_result["producers"] = sizes.latency_heavy_producers
    reset_outbox(env)
    return {
        "latency_p50_ms": light_result["p50_ms"],
        "latency_p99_ms": light_result["p99_ms"],
        "detail": {"light": {**light_result, "target_rate_per_s": rate}, "heavy": heavy_result},
    }
