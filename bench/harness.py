"""``make bench`` / ``make bench-quick``: run every figure, print a table, write
bench/results/latest.json.

Usage (with the services up, see scripts/run-bench.sh):
    python -m bench.harness [--quick] [--only enqueue,relay,latency,e2e,backlog] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import FULL, QUICK, ROOT, TEMPLATES, Env, Sizes, as_dict

FIGURES = ("enqueue", "relay", "latency", "e2e", "backlog", "scrape")

TARGETS: dict[str, tuple[str, float]] = {
    "enqueue_ratio": ("<=", 1.0),
    "enqueue_django_ratio": ("<=", 1.05),
    "relay_vs_raw": (">=", 0.5),
    "relay_vs_naive": (">=", 5.0),
    "latency_p50_ms": ("<=", 5.0),
    "latency_p99_ms": ("<=", 25.0),
    "e2e_ratio": (">=", 0.9),  # issue 11 (0.8 before)
    "e2e_drain_ratio": (">=", 0.95),  # issue 11
    "claim_scale_ratio": ("<=", 1.5),
    "relay_rss_mb": ("<=", 150.0),
}
KEYS = (
    "enqueue_ratio",
    "enqueue_ratio_100",
    "enqueue_django_ratio",
    "relay_jobs_per_s",
    "relay_vs_raw",
    "relay_vs_naive",
    "relay2_jobs_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "e2e_ratio",
    "claim_scale_ratio",
    "relay_rss_mb",
)
"""Every figure the issue asks for (baselines and details are under ``figures``)."""
EXTRA_KEYS = (
    "e2e_drain_ratio",
    "metrics_scrape_ms_1m",
    "enqueue_django_delay_ratio",
    "db_statements_per_job_django_staged",
)
"""Figures of our own, printed and written alongside (no target)."""
DB_KEYS = (
    "db_statements_per_job_direct",
    "db_statements_per_job_staged",
    "db_wal_bytes_per_job_direct",
    "db_wal_bytes_per_job_staged",
    "db_statements_per_job_relay_complete",
    "db_wal_bytes_per_job_relay_complete",
)
"""The database's cost per job on PostgreSQL (bench/dbcost.py): counts, not timings, so they do not
depend on the CPU. Direct and staged come from the enqueue figure, relay_complete from the e2e
drain."""
RATIO_PARTS = ("_rounds", "_spread")
"""Next to each ratio key: its per-round ratios and their (min, max); the key is their median."""


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(env: Env) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with env.pg() as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg_settings = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in (
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "shared_buffers",
                "shared_preload_libraries",
            )
        }
    client = env.redis()
    redis_version = str(client.info("server").get("redis_version"))
    client.close()
    versions = {}
    for dist in ("reliable-job", "celery", "kombu", "redis", "SQLAlchemy", "psycopg"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": _memory_mb(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": row[0] if row else "unknown",
        "postgresql_settings": pg_settings,
        "redis": redis_version,
        "versions": versions,
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "git_branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        "git_dirty": bool(status and status != "unknown"),
    }


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def check_targets(figures: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = figures.get(key)
        ok = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[key] = {"target": f"{op} {bound:g}", "value": value, "pass": ok}
    return out


def table(result: dict[str, Any]) -> str:
    targets = result["targets"]
    lines = [f"{'figure':<36} {'value':>10}  {'rounds (min..max)':<18} {'target':<10} result", "-" * 86]
    for key in KEYS + EXTRA_KEYS + DB_KEYS:
        value = result.get(key)
        t = targets.get(key)
        verdict = "" if t is None else {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        shown = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        spread = result.get(f"{key}_spread")
        rounds = result.get(f"{key}_rounds")
        between = f"{len(rounds)}: {spread[0]:g}..{spread[1]:g}" if spread and rounds else ""
        lines.append(f"{key:<36} {shown:>10}  {between:<18} {t['target'] if t else '':<10} {verdict}")
    b = result["baselines"]
    lines.append("")
    lines.append("baselines: " + ", ".join(f"{k}={v}" for k, v in b.items()))
    return "\n".join(lines)


def baselines(figures: dict[str, Any]) -> dict[str, Any]:
    """The absolute numbers each ratio is taken against (and the relay's own)."""
    out: dict[str, Any] = {}
    if "enqueue" in figures:
        d = figures["enqueue"]["detail"]
        out["enqueue_direct_us"] = d["one_task"]["direct_us"]
        out["enqueue_staged_us"] = d["one_task"]["staged_us"]
        out["enqueue_direct_100_us"] = d["hundred_tasks"]["direct_us"]
        out["enqueue_staged_100_us"] = d["hundred_tasks"]["staged_us"]
        out["enqueue_django_direct_us"] = d["django"]["direct_us"]
        out["enqueue_django_staged_us"] = d["django"]["staged_us"]
        out["enqueue_django_delay_direct_us"] = d["django"]["delay"]["direct_us"]
        out["enqueue_django_delay_staged_us"] = d["django"]["delay"]["staged_us"]
    if "relay" in figures:
        d = figures["relay"]["detail"]
        out["raw_jobs_per_s"] = d["raw"]["jobs_per_s"]
        out["naive_jobs_per_s"] = d["naive"]["jobs_per_s"]
    if "latency" in figures:
        d = figures["latency"]["detail"]
        out["latency_heavy_p50_ms"] = d["heavy"]["p50_ms"]
        out["latency_heavy_p99_ms"] = d["heavy"]["p99_ms"]
    if "e2e" in figures:
        d = figures["e2e"]["detail"]
        out["e2e_plain_jobs_per_s"] = d["plain_jobs_per_s"]
        out["e2e_reliable_jobs_per_s"] = d["reliable_jobs_per_s"]
        out["e2e_drain_plain_jobs_per_s"] = d["drain"]["plain_jobs_per_s"]
        out["e2e_drain_reliable_jobs_per_s"] = d["drain"]["reliable_jobs_per_s"]
    if "backlog" in figures:
        d = figures["backlog"]["detail"]
        out["claim_small_ms"] = d["claim_small_ms"]
        out["claim_large_ms"] = d["claim_large_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.harness", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 3 minutes)")
    parser.add_argument("--only", default=",".join(FIGURES), help="comma-separated figures")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args(argv)
    only = [f for f in args.only.split(",") if f]
    unknown = set(only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")

    env = Env.from_environ()
    os.environ.update(env.library_environ())  # before bench.app is first imported
    sizes: Sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="reliable-job-bench-"))

    from bench import backlog, e2e, enqueue, latency, relay, scrape
    from bench.app import runtime
    from bench.common import make_templates

    runtime.database.create_table()
    make_templates(env)
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "enqueue": lambda: enqueue.run(env, sizes),
        "relay": lambda: relay.run(env, sizes, log_dir),
        "latency": lambda: latency.run(env, sizes, log_dir),
        "e2e": lambda: e2e.run(env, sizes, log_dir),
        "backlog": lambda: backlog.run(env, sizes, log_dir),
        "scrape": lambda: scrape.run(env, sizes, log_dir),
    }
    figures: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in only:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        figures[name] = steps[name]()
        timings[name] = round(time.monotonic() - t0, 1)
        print(f"bench: {name} done in {timings[name]}s", file=sys.stderr, flush=True)
    runtime.database.table.drop(runtime.database.engine, checkfirst=True)
    with env.pg() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TEMPLATES}")

    keys: dict[str, Any] = {}
    for fig in figures.values():
        keys.update({k: v for k, v in fig.items() if k != "detail"})
    result: dict[str, Any] = {}  # every key at the top level, each ratio's rounds and spread next to it
    for key in KEYS + EXTRA_KEYS + DB_KEYS:
        result[key] = keys.get(key)
        result.update({key + part: keys[key + part] for part in RATIO_PARTS if key + part in keys})
    result.update(
        {
            "quick": sizes.quick,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "targets": check_targets(keys),
            "baselines": baselines(figures),
            "machine": machine(env),
            "sizes": as_dict(sizes),
            "figures": figures,
            "seconds": {**timings, "total": round(time.monotonic() - started, 1)},
            "logs": str(log_dir),
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {out} ({'quick' if sizes.quick else 'full'} run, {result['seconds']['total']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
