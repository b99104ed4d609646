"""``make bench-peers``: reliable-job, django-celery-outbox 0.4.3 and plain Celery, one run.

Usage (services up, in .venv-peers; see scripts/run-bench-peers.sh):
    python -m bench.peers [--quick] [--out bench/results/peers.json]

Three figures, the systems alternating in blocks (the order rotates every round, so a change in the
machine's load lands on every side of a round's ratio; each ratio is the median of the per-round
ratios, with the rounds and their spread):

1. enqueue: a request transaction (``atomic()``: create a row, ``.delay()``), mean µs per
   transaction over a block; ``enqueue_vs_peer`` = reliable-job µs / peer µs (lower is better for
   reliable-job: < 1 means it is cheaper), ``enqueue_vs_plain`` = each outbox's µs / plain
   Celery's (µs for ``.delay()`` alone inside the transaction in the detail);
2. relay: each outbox's own relay (running, connected, idle) and ``relay_rows`` jobs committed in
   one transaction; jobs/s from COMMIT until the last message is in Redis; ``relay_vs_peer`` =
   reliable-job jobs/s / peer jobs/s (higher is better for reliable-job);
3. latency: one job per transaction at ``latency_rate`` jobs/s with the relay running; COMMIT to
   the message's arrival on Redis (a consumer BRPOPs the queue); ``latency_p50_vs_peer`` =
   reliable-job p50 / peer p50 (lower is better for reliable-job).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, Env, log, median, paired, percentile
from bench.peers.projects import QUEUE, RELAY_COMMANDS, SYSTEMS, Project, create_all, server_url
from reliable_job.processes import Process, wait_for

OUTBOXES = ("reliable_job", "peer")
DIRECTIONS = {
    "enqueue_vs_peer": "reliable-job µs / peer µs per request transaction: < 1, reliable-job is cheaper",
    "enqueue_vs_plain": "each outbox's µs / plain Celery's per request transaction: 1, as cheap as a push",
    "relay_vs_peer": "reliable-job jobs/s / peer jobs/s draining the backlog: > 1, reliable-job is faster",
    "latency_p50_vs_peer": "reliable-job p50 / peer p50, COMMIT to Redis: < 1, reliable-job is faster",
}


@dataclass(frozen=True)
class Sizes:
    quick: bool
    enqueue_rounds: int
    enqueue_block: int
    relay_rows: int
    relay_rounds: int
    latency_rate: float
    latency_seconds: float
    latency_rounds: int


FULL = Sizes(False, 9, 200, 20_000, 2, 100.0, 10.0, 2)
QUICK = Sizes(True, 5, 100, 20_000, 1, 100.0, 5.0, 1)


class Server:
    """A measuring server (bench/peers/server.py) in ``project``, spoken to over pipes."""

    def __init__(self, project: Project, log_dir: Path) -> None:
        self.system = project.system
        self._log = open(log_dir / f"server-{project.system}.log", "wb")  # noqa: SIM115 - closed in close()
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "bench.peers.server"],
            env=project.env(PEERS_APPLICATION_NAME=f"server-{project.system}"),
            cwd=project.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self._popen.stdout is not None
        line = self._popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.system} server exited; see server-{self.system}.log")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._popen.stdin is not None
        self._popen.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._popen.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self._popen.poll() is None:
                self.ask_quit()
                self._popen.wait(timeout=30)
        finally:
            if self._popen.poll() is None:
                self._popen.kill()
                self._popen.wait()
            self._log.close()

    def ask_quit(self) -> None:
        assert self._popen.stdin is not None
        self._popen.stdin.write('{"op": "quit"}\n')
        self._popen.stdin.flush()


def rotated(items: tuple[str, ...], r: int) -> list[str]:
    """``items`` starting at position ``r``: every system leads (and trails) in turn."""
    k = r % len(items)
    return list(items[k:] + items[:k])


def flush(project: Project) -> None:
    client = redis.Redis.from_url(project.redis_url)
    client.flushdb()
    client.close()


# -- figure 1: enqueue ------------------------------------------------------------------------------


def enqueue(servers: dict[str, Server], projects: dict[str, Project], sizes: Sizes) -> dict[str, Any]:
    us: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    delay_us: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for s in SYSTEMS:  # warm up: connections, prepared messages, caches
        servers[s].ask("enqueue", n=max(5, sizes.enqueue_block // 4))
    for r in range(sizes.enqueue_rounds):
        for s in SYSTEMS:
            servers[s].ask("reset")
            flush(projects[s])
        for s in rotated(SYSTEMS, r):
            answer = servers[s].ask("enqueue", n=sizes.enqueue_block)
            us[s].append(answer["us"])
            delay_us[s].append(answer["delay_us"])
        log(f"enqueue round {r + 1}: " + ", ".join(f"{s} {us[s][-1]:.0f} µs" for s in SYSTEMS))
    vs_peer = paired(us["reliable_job"], us["peer"])
    vs_plain = {s: paired(us[s], us["plain"]) for s in OUTBOXES}
    return {
        "enqueue_vs_peer": vs_peer["value"],
        "enqueue_vs_peer_rounds": vs_peer["rounds"],
        "enqueue_vs_peer_spread": vs_peer["spread"],
        "enqueue_vs_plain": {s: vs_plain[s]["value"] for s in OUTBOXES},
        "enqueue_vs_plain_rounds": {s: vs_plain[s]["rounds"] for s in OUTBOXES},
        "enqueue_vs_plain_spread": {s: vs_plain[s]["spread"] for s in OUTBOXES},
        "detail": {
            "transactions_per_block": sizes.enqueue_block,
            "rounds": sizes.enqueue_rounds,
            "us": {s: round(median(us[s]), 1) for s in SYSTEMS},
            "us_rounds": {s: [round(x, 1) for x in us[s]] for s in SYSTEMS},
            "delay_us": {s: round(median(delay_us[s]), 1) for s in SYSTEMS},
            "delay_us_rounds": {s: [round(x, 1) for x in delay_us[s]] for s in SYSTEMS},
        },
    }


# -- the relays -------------------------------------------------------------------------------------


def start_relay(project: Project, log_dir: Path) -> Process:
    name = f"relay-{project.system}"
    return Process(
        project.manage(*RELAY_COMMANDS[project.system]),
        log_dir / f"{name}.log",
        env=project.env(PEERS_APPLICATION_NAME=name),
        cwd=project.path,
        name=name,
    )


def wait_queued(project: Project, count: int, timeout: float, relay: Process) -> tuple[float, float]:
    """Poll the queue's length until it holds ``count`` messages: (first seen, all there) times."""
    client = redis.Redis.from_url(project.redis_url)
    first = 0.0
    deadline = time.monotonic() + timeout
    try:
        while True:
            length = client.llen(QUEUE)
            now = time.time()
            if length and not first:
                first = now
            if length >= count:
                return first, now
            if time.monotonic() > deadline or not relay.alive():
                raise RuntimeError(f"{relay.name}: {length} of {count} messages in Redis\n{relay.log_tail()}")
            time.sleep(0.005)
    finally:
        client.close()


def probe(server: Server, project: Project, relay: Process) -> None:
    """One job through the running relay: it is connected and warm."""
    server.ask("reset")
    flush(project)
    server.ask("bulk", n=1)
    wait_queued(project, 1, 120, relay)


def drain(
    servers: dict[str, Server], projects: dict[str, Project], relays: dict[str, Process], sizes: Sizes
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {s: [] for s in OUTBOXES}
    first_ms: dict[str, list[float]] = {s: [] for s in OUTBOXES}
    for r in range(sizes.relay_rounds):
        for s in rotated(OUTBOXES, r):
            servers[s].ask("reset")
            flush(projects[s])
            committed = servers[s].ask("bulk", n=sizes.relay_rows)["committed_at"]
            first, done = wait_queued(projects[s], sizes.relay_rows, 900, relays[s])
            rates[s].append(sizes.relay_rows / (done - committed))
            first_ms[s].append((first - committed) * 1000)
            log(f"relay round {r + 1}: {s} {rates[s][-1]:.0f} jobs/s")
            servers[s].ask("reset")
            flush(projects[s])
    ratio = paired(rates["reliable_job"], rates["peer"])
    return {
        "relay_vs_peer": ratio["value"],
        "relay_vs_peer_rounds": ratio["rounds"],
        "relay_vs_peer_spread": ratio["spread"],
        "detail": {
            "rows": sizes.relay_rows,
            "rounds": sizes.relay_rounds,
            "jobs_per_s": {s: round(median(rates[s])) for s in OUTBOXES},
            "jobs_per_s_rounds": {s: [round(x) for x in rates[s]] for s in OUTBOXES},
            "first_message_ms": {s: round(median(first_ms[s]), 1) for s in OUTBOXES},
        },
    }


# -- figure 3: latency ------------------------------------------------------------------------------


def _consume(project: Project, count: int, arrivals: dict[str, float], stop: threading.Event) -> None:
    client = redis.Redis.from_url(project.redis_url)
    try:
        while not stop.is_set() and len(arrivals) < count:
            item = client.brpop([QUEUE], timeout=0.2)
            if item is not None:
                at = time.time()
                arrivals[json.loads(item[1])["headers"]["id"]] = at
    finally:
        client.close()


def latency(servers: dict[str, Server], projects: dict[str, Project], sizes: Sizes) -> dict[str, Any]:
    p50: dict[str, list[float]] = {s: [] for s in OUTBOXES}
    p99: dict[str, list[float]] = {s: [] for s in OUTBOXES}
    rates: dict[str, list[float]] = {s: [] for s in OUTBOXES}
    warm = int(sizes.latency_rate)  # one second
    count = int(sizes.latency_rate * sizes.latency_seconds)
    for r in range(sizes.latency_rounds):
        for s in rotated(OUTBOXES, r):
            servers[s].ask("reset")
            flush(projects[s])
            arrivals: dict[str, float] = {}
            stop = threading.Event()
            consumer = threading.Thread(target=_consume, args=(projects[s], warm + count, arrivals, stop))
            consumer.start()
            answer = servers[s].ask("steady", rate=sizes.latency_rate, warm=warm, count=count)
            committed: dict[str, float] = dict(answer["committed"])

            def all_arrived(
                arrivals: dict[str, float] = arrivals, committed: dict[str, float] = committed
            ) -> bool:
                return all(k in arrivals for k in committed)

            wait_for(
                all_arrived,
                timeout=60,
                interval=0.05,
                message=f"{s}: every job in Redis",
            )
            stop.set()
            consumer.join()
            ms = [(arrivals[k] - t) * 1000 for k, t in committed.items()]
            p50[s].append(percentile(ms, 50))
            p99[s].append(percentile(ms, 99))
            rates[s].append((warm + count) / answer["seconds"])
            log(f"latency round {r + 1}: {s} p50 {p50[s][-1]:.1f} ms, p99 {p99[s][-1]:.1f} ms")
    ratio = paired(p50["reliable_job"], p50["peer"], digits=4)
    return {
        "latency_p50_vs_peer": ratio["value"],
        "latency_p50_vs_peer_rounds": ratio["rounds"],
        "latency_p50_vs_peer_spread": ratio["spread"],
        "detail": {
            "rate_per_s": sizes.latency_rate,
            "jobs_per_round": count,
            "rounds": sizes.latency_rounds,
            "p50_ms": {s: round(median(p50[s]), 2) for s in OUTBOXES},
            "p99_ms": {s: round(median(p99[s]), 2) for s in OUTBOXES},
            "commit_rate_per_s": {s: round(median(rates[s]), 1) for s in OUTBOXES},
            "p50_ms_rounds": {s: [round(x, 2) for x in p50[s]] for s in OUTBOXES},
            "p99_ms_rounds": {s: [round(x, 2) for x in p99[s]] for s in OUTBOXES},
        },
    }


# -- the run ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {}
    for dist in ("reliable-job", "django-celery-outbox", "Django", "celery", "kombu", "redis", "psycopg"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (the same 20,000-row drain)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    env = Env.from_environ()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="reliable-job-peers-"))
    log_dir = base / "logs"
    log_dir.mkdir()
    log(f"projects and logs in {base}")
    projects = create_all(base, env.postgres_url, server_url(env.redis_url), log_dir)
    servers: dict[str, Server] = {}
    relays: dict[str, Process] = {}
    seconds: dict[str, float] = {}
    figures: dict[str, Any] = {}
    try:
        for s in SYSTEMS:
            servers[s] = Server(projects[s], log_dir)
        t0 = time.monotonic()
        figures["enqueue"] = enqueue(servers, projects, sizes)
        seconds["enqueue"] = round(time.monotonic() - t0, 1)
        for s in OUTBOXES:
            servers[s].ask("reset")
            relays[s] = start_relay(projects[s], log_dir)
        for s in OUTBOXES:
            probe(servers[s], projects[s], relays[s])
        t0 = time.monotonic()
        figures["relay"] = drain(servers, projects, relays, sizes)
        seconds["relay"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        figures["latency"] = latency(servers, projects, sizes)
        seconds["latency"] = round(time.monotonic() - t0, 1)
    finally:
        for relay in relays.values():
            relay.stop(timeout=60)
        for server in servers.values():
            server.close()

    from bench.harness import machine

    info = machine(env)
    git = f"{info['git_commit']}{' (dirty)' if info['git_dirty'] else ''}"
    result: dict[str, Any] = {}
    for fig in figures.values():
        result.update({k: v for k, v in fig.items() if k != "detail"})
    result.update(
        {
            "directions": DIRECTIONS,
            "quick": sizes.quick,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {**versions(), "reliable-job git": git},
            "machine": info,
            "sizes": asdict(sizes),
            "figures": {k: v["detail"] for k, v in figures.items()},
            "seconds": {**seconds, "total": round(time.monotonic() - started, 1)},
            "logs": str(log_dir),
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary(result))
    print(f"\nwrote {out} ({'quick' if sizes.quick else 'full'} run, {result['seconds']['total']}s)")
    return 0


def summary(result: dict[str, Any]) -> str:
    f = result["figures"]
    e, r, la = f["enqueue"], f["relay"], f["latency"]
    rows = [
        ("request transaction, median µs", *(f"{e['us'][s]:,.0f}" for s in SYSTEMS)),
        (".delay() inside it, median µs", *(f"{e['delay_us'][s]:,.0f}" for s in SYSTEMS)),
        (
            "ratio to plain Celery",
            *(f"{result['enqueue_vs_plain'][s]:.2f}" for s in OUTBOXES),
            "1",
        ),
        (f"relay drain of {r['rows']:,} rows, jobs/s", *(f"{r['jobs_per_s'][s]:,}" for s in OUTBOXES), ""),
        (
            f"COMMIT -> Redis at {la['rate_per_s']:g}/s, p50 / p99 ms",
            *(f"{la['p50_ms'][s]:g} / {la['p99_ms'][s]:g}" for s in OUTBOXES),
            "",
        ),
    ]
    lines = [f"{'measure':<42} {'reliable-job':>14} {'peer':>14} {'plain':>8}", "-" * 82]
    lines += [f"{a:<42} {b:>14} {c:>14} {d:>8}" for a, b, c, d in rows]
    lines.append("")
    for key in ("enqueue_vs_peer", "relay_vs_peer", "latency_p50_vs_peer"):
        lines.append(f"{key} = {result[key]:g} (rounds {result[key + '_rounds']}); {DIRECTIONS[key]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
