"""The measuring server: runs inside one of the bench's Django projects (its settings, its Celery
app, its outbox) and does what the coordinator asks, one JSON line per request and per answer.

Requests (``{"op": ...}``):

* ``enqueue`` ``n``: ``n`` request transactions (``atomic()``: create an ``Order``, ``noop.delay()``);
  answers the mean µs per transaction and per ``.delay()`` call inside it;
* ``bulk`` ``n``: ``n`` jobs in one transaction (the relay drain's backlog): the first
  :data:`TEMPLATES` staged through ``.delay()``, the rest copies of them made by one INSERT, each
  with a fresh task id (what the relay reads is what staging writes, without waiting minutes for
  20,000 ``.delay()`` calls); answers the wall-clock time COMMIT returned;
* ``steady`` ``rate``, ``warm``, ``count``: one job per transaction at ``rate`` per second;
  answers ``[[task id, COMMIT time], ...]`` for the ``count`` jobs after the ``warm`` first;
* ``reset``: empty the outbox and the orders; ``quit``.

Answers go to the process's original stdout; everything else printed (Django, structlog) goes to
stderr, so nothing a library prints can break the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

TEMPLATES = 100
COPIES = {
    "reliable_job": (
        "INSERT INTO {table} (job_id, task_name, queue, message, state, attempts, last_error, "
        "available_at, created_at, eta, sent_at, updated_at) "
        "SELECT s.u, t.task_name, t.queue, replace(t.message, t.job_id, s.u), t.state, t.attempts, "
        "t.last_error, t.available_at, now(), t.eta, t.sent_at, now() "
        "FROM (SELECT g, gen_random_uuid()::text AS u FROM generate_series(1, %s) AS g) AS s "
        "JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS k, * FROM {table}) AS t "
        "ON t.k = s.g %% %s ORDER BY s.g"
    ),
    "peer": (
        "INSERT INTO {table} (created_at, retries, task_id, task_name, args, kwargs, redacted_args, "
        "redacted_kwargs, options, sentry_trace_id, sentry_baggage, structlog_context, schema_version) "
        "SELECT now(), t.retries, s.u, t.task_name, t.args, t.kwargs, t.redacted_args, t.redacted_kwargs, "
        "t.options, t.sentry_trace_id, t.sentry_baggage, t.structlog_context, t.schema_version "
        "FROM (SELECT g, gen_random_uuid()::text AS u FROM generate_series(1, %s) AS g) AS s "
        "JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS k, * FROM {table}) AS t "
        "ON t.k = s.g %% %s ORDER BY s.g"
    ),
}
"""One INSERT copying the staged templates ``n`` times, per outbox (its own columns)."""


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import django

    django.setup()
    from django.db import connection, transaction
    from shop.models import Order  # type: ignore[import-not-found]
    from shop.tasks import noop  # type: ignore[import-not-found]

    from bench.peers.projects import OUTBOX_TABLES

    system = os.environ["PEERS_SYSTEM"]
    outbox = OUTBOX_TABLES.get(system)

    def enqueue(n: int) -> dict[str, Any]:
        in_delay = 0.0
        perf = time.perf_counter
        start = perf()
        for i in range(n):
            with transaction.atomic():
                Order.objects.create(item="book")
                t0 = perf()
                noop.delay(i)
                in_delay += perf() - t0
        elapsed = perf() - start
        return {"us": elapsed / n * 1e6, "delay_us": in_delay / n * 1e6}

    def bulk(n: int) -> dict[str, Any]:
        templates = min(n, TEMPLATES)
        with transaction.atomic():
            for i in range(templates):
                noop.delay(i)
            if n > templates and outbox is not None:
                with connection.cursor() as cursor:
                    cursor.execute(COPIES[system].format(table=outbox), [n - templates, templates])
        return {"committed_at": time.time()}

    def steady(rate: float, warm: int, count: int) -> dict[str, Any]:
        committed: list[tuple[str, float]] = []
        start = time.perf_counter()
        for i in range(warm + count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with transaction.atomic():
                Order.objects.create(item="book")
                job_id = noop.delay(i).id
            if i >= warm:
                committed.append((job_id, time.time()))
        return {"committed": committed, "seconds": time.perf_counter() - start}

    def reset() -> dict[str, Any]:
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE shop_order RESTART IDENTITY")
            if outbox is not None:
                cursor.execute(f"TRUNCATE {outbox}")
        return {}

    ops = {
        "enqueue": lambda r: enqueue(int(r["n"])),
        "bulk": lambda r: bulk(int(r["n"])),
        "steady": lambda r: steady(float(r["rate"]), int(r["warm"]), int(r["count"])),
        "reset": lambda r: reset(),
    }
    protocol.write(json.dumps({"ready": system}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        protocol.write(json.dumps(ops[request["op"]](request)) + "\n")


if __name__ == "__main__":
    main()
