"""Figure 2, relay throughput: a backlog of staged rows drained into Redis.

* ``relay``: one ``reliable-job relay --app bench.app:app`` process (production settings), then two.
  The backlog is inserted in one transaction that stays open until the relays have connected and
  polled. The queue length is sampled every 5 ms; the rate is the messages that arrived after the
  first sample that saw any, over the time until the sample that saw them all, so process start-up
  and the idle poll wait (figure 3's subject) are left out.
* ``raw``: the limit, written directly with psycopg and redis-py in this process: claim 500 rows
  (``FOR UPDATE SKIP LOCKED``, the library's WHERE clause), one LPUSH carrying the whole batch, one
  ``UPDATE ... SET state = 'sent' ... WHERE id = ANY(%s)``, COMMIT; timed the same way, from the
  first batch in Redis to the last. It is the issue's reference recipe (4 round trips a batch),
  not a hard bound: a relay that claims and marks in one ``UPDATE ... RETURNING`` can beat it.
* ``naive``: per row, Celery's ``send_task`` (of a plain Celery app: the message is rebuilt from the
  row's task name and arguments) and one UPDATE; COMMIT per claimed batch.

Every phase starts from an empty table and an empty Redis database and loads the same messages
(copies of jobs staged through the library, see ``common.make_templates``). ``relay_rounds``
rounds each run raw, one relay process and naive back to back (the order rotates every round):
``relay_vs_raw`` and ``relay_vs_naive`` are medians of the per-round ratios, ``relay_jobs_per_s``
the median relay rate. Two relay processes run once, after the rounds.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.app import QUEUE
from bench.common import (
    TABLE,
    Env,
    Sizes,
    load_rows,
    log,
    median,
    paired,
    pending,
    ratio_keys,
    relay_process,
    reset_outbox,
    running,
    wait_connected,
    wait_for,
)

BATCH = 500
CLAIM = (
    f"SELECT id, job_id, task_name, message FROM {TABLE} "
    "WHERE state = 'pending' AND (available_at IS NULL OR available_at <= now()) "
    f"ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
)
MARK_SENT = (
    f"UPDATE {TABLE} SET state = 'sent', sent_at = now(), updated_at = now(), available_at = NULL, "
    "attempts = attempts + 1 WHERE id = ANY(%s)"
)


class QueueWatch:
    """Samples the queue length every 5 ms until it reaches ``target``."""

    def __init__(self, env: Env, target: int) -> None:
        self.client = env.redis()
        self.target = target
        self.first: tuple[float, int] | None = None
        self.last: float | None = None

    def wait(self, timeout: float) -> float:
        """Jobs/s between the first sample that saw messages and the one that saw them all:
        (target - messages at the first sample) / elapsed. Raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            n = int(self.client.llen(QUEUE))
            now = time.perf_counter()
            if n and self.first is None:
                self.first = (now, n)
            if n >= self.target:
                self.last = now
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {self.target} messages reached Redis")
            time.sleep(0.005)
        assert self.first is not None
        self.client.close()
        return (self.target - self.first[1]) / max(self.last - self.first[0], 1e-6)


def relay_processes(env: Env, rows: int, count: int, log_dir: Path, label: str) -> dict[str, Any]:
    reset_outbox(env)
    loader = env.pg(autocommit=False)
    load_rows(loader, rows)  # uncommitted: invisible to the relays until COMMIT
    log(f"{label}: {rows} rows loaded (uncommitted), starting {count} relay process(es)")
    children = [relay_process(env, f"{label}-{i}", log_dir) for i in range(count)]
    with running(children):
        wait_connected(env, children)
        log(f"{label}: relays polling, COMMIT")
        watch = QueueWatch(env, rows)
        loader.commit()
        loader.close()
        rate = watch.wait(timeout=rows / 200 + 120)
        log(f"{label}: {rows} messages in Redis, {rate:.0f} jobs/s")
        wait_for(lambda: pending(env) == 0, timeout=60, interval=0.01, message="the outbox to drain")
    return {"rows": rows, "processes": count, "jobs_per_s": round(rate)}


def raw(env: Env, rows: int) -> dict[str, Any]:
    reset_outbox(env)
    with env.pg(autocommit=False) as conn:
        load_rows(conn, rows)
        conn.commit()
    client = env.redis()
    conn = env.pg(autocommit=False)
    start = time.perf_counter()
    first: tuple[float, int] | None = None
    last = start
    done = 0
    while True:
        claimed = conn.execute(CLAIM).fetchall()
        if not claimed:
            conn.commit()
            break
        client.lpush(QUEUE, *[row[3] for row in claimed])
        done += len(claimed)
        last = time.perf_counter()
        if first is None:
            first = (last, done)
        conn.execute(MARK_SENT, ([row[0] for row in claimed],))
        conn.commit()
    seconds = time.perf_counter() - start
    conn.close()
    assert client.llen(QUEUE) == rows == done, "raw relay lost rows"
    client.close()
    assert first is not None
    # measured like the relay processes: from the first batch in Redis to the last one
    rate = (rows - first[1]) / max(last - first[0], 1e-6)
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(rate),
        "jobs_per_s_whole_loop": round(rows / seconds),
    }


def task_arguments(message: str) -> tuple[list[Any], dict[str, Any]]:
    """A stored message's task arguments, for the naive relay: the body (Celery's protocol 2,
    ``[args, kwargs, embed]``) of a v1 envelope (``body``, ``body_encoding``) or of a v2 one
    (kombu's Redis ``payload``)."""
    doc = json.loads(message)
    if "payload" in doc:
        payload = doc["payload"]
        body = payload["body"]
        base64_body = payload["properties"].get("body_encoding") == "base64"
    else:
        body = doc["body"]
        base64_body = doc["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(body) if base64_body else body)
    return args, kwargs


def naive(env: Env, rows: int) -> dict[str, Any]:
    reset_outbox(env)
    with env.pg(autocommit=False) as conn:
        load_rows(conn, rows)
        conn.commit()
    plain = Celery("naive", broker=env.redis_url)
    plain.conf.task_default_queue = QUEUE
    conn = env.pg(autocommit=False)
    start = time.perf_counter()
    while True:
        claimed = conn.execute(CLAIM).fetchall()
        if not claimed:
            conn.commit()
            break
        for row_id, job_id, task_name, message in claimed:
            args, kwargs = task_arguments(message)
            plain.send_task(task_name, args, kwargs, task_id=job_id)
            conn.execute(MARK_SENT, ([row_id],))
        conn.commit()
    seconds = time.perf_counter() - start
    conn.close()
    client = env.redis()
    assert client.llen(QUEUE) == rows, "naive relay lost rows"
    client.close()
    plain.close()
    return {"rows": rows, "seconds": round(seconds, 3), "jobs_per_s": round(rows / seconds)}


def run(env: Env, sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"raw": [], "relay": [], "naive": []}
    for r in range(sizes.relay_rounds):
        phases = ["raw", "relay", "naive"]
        for phase in phases[r % 3 :] + phases[: r % 3]:  # each phase leads one round in three
            if phase == "raw":
                result = raw(env, sizes.relay_rows)
            elif phase == "relay":
                result = relay_processes(env, sizes.relay_rows, 1, log_dir, f"relay1-{r}")
            else:
                result = naive(env, sizes.naive_rows)
            rounds[phase].append(result)
            log(f"round {r} {phase}: {result}")
    relay2 = relay_processes(env, sizes.relay_rows, 2, log_dir, "relay2")
    reset_outbox(env)
    rates = {phase: [float(x["jobs_per_s"]) for x in results] for phase, results in rounds.items()}
    detail: dict[str, Any] = {
        phase: {"jobs_per_s": round(median(rates[phase])), "rounds": results}
        for phase, results in rounds.items()
    }
    detail["relay2"] = relay2
    return {
        "relay_jobs_per_s": detail["relay"]["jobs_per_s"],
        "relay2_jobs_per_s": relay2["jobs_per_s"],
        **ratio_keys("relay_vs_raw", paired(rates["relay"], rates["raw"])),
        **ratio_keys("relay_vs_naive", paired(rates["relay"], rates["naive"], digits=2)),
        "detail": detail,
    }
