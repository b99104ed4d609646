"""End to end: a canvas or a call that carries any reliable task is staged whole (issue 9,
failure 6). Rolled back, none of its steps runs; committed, every step runs exactly once and the
outbox ends empty.

The cases: a chain whose first step is not reliable, ``link`` and ``link_error`` to a reliable
task on one that is not, ``chunks``/``map``/``starmap`` of a reliable task, a group with one
reliable member, a chord with a reliable body, a chord with one reliable header part. The steps
Celery publishes from the worker after a task (the rest of a chain, callbacks, the chord body)
are staged there like any reliable job enqueued from a task (in a transaction of their own): the
tests check that they run once and leave no row, not how they are handed off.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from reliable_job import bind
from tests.conftest import count_rows, wait_for


def canvases() -> dict[str, tuple[Callable[[], object], list[str]]]:
    """Each case: what enqueues it, and the markers its steps record when it runs."""
    from celery import chain, chord, group

    from tests.apps.celery_app import plain_fail, plain_step, reliable_step

    return {
        "chain": (
            lambda: chain(plain_step.si("chain-1"), reliable_step.si("chain-2")).apply_async(),
            ["chain-1", "chain-2"],
        ),
        "link": (
            lambda: plain_step.apply_async(("link-1",), link=reliable_step.si("link-2")),
            ["link-1", "link-2"],
        ),
        "link_error": (
            lambda: plain_fail.apply_async(("errback-1",), link_error=reliable_step.si("errback-2")),
            ["errback-1", "errback-2"],
        ),
        "chunks": (
            lambda: reliable_step.chunks([("chunks-1",), ("chunks-2",), ("chunks-3",)], 2).apply_async(),
            ["chunks-1", "chunks-2", "chunks-3"],
        ),
        "map": (lambda: reliable_step.map(["map-1", "map-2"]).apply_async(), ["map-1", "map-2"]),
        "starmap": (
            lambda: reliable_step.starmap([("starmap-1",), ("starmap-2",)]).apply_async(),
            ["starmap-1", "starmap-2"],
        ),
        "group": (
            lambda: group(plain_step.si("group-1"), reliable_step.si("group-2")).apply_async(),
            ["group-1", "group-2"],
        ),
        "chord-body": (
            lambda: chord(
                [plain_step.si("cbody-1"), plain_step.si("cbody-2")], reliable_step.si("cbody-3")
            ).apply_async(),
            ["cbody-1", "cbody-2", "cbody-3"],
        ),
        "chord-header": (
            lambda: chord(
                [plain_step.si("chead-1"), reliable_step.si("chead-2")], plain_step.si("chead-3")
            ).apply_async(),
            ["chead-1", "chead-2", "chead-3"],
        ),
    }


@pytest.fixture
def canvas_app(services, celery_app, redis_url, monkeypatch):
    """The test app with a Redis result backend (chords need one), here and in the worker."""
    backend_url = redis_url.rsplit("/", 1)[0] + "/1"
    services.extra_env["RJ_TEST_RESULT_BACKEND"] = backend_url
    monkeypatch.setattr(celery_app.conf, "result_backend", backend_url)
    monkeypatch.setattr(celery_app, "_backend_cache", None)
    monkeypatch.delattr(celery_app._local, "backend", raising=False)
    yield celery_app
    # Forget the results the direct publishes subscribed to while the backend can still
    # unsubscribe (else their __del__ tries at interpreter exit).
    celery_app.backend._pending_results.concrete.clear()
    gc.collect()
    celery_app.backend.client.flushdb()
    celery_app.backend.client.close()


def enqueue(engine, make: Callable[[], object], *, commit: bool) -> None:
    """``make()`` inside a transaction of the test's own, then commit or roll back."""
    with Session(engine) as session, bind(session):
        make()
        if commit:
            session.commit()
        else:
            session.rollback()


def settle(services, engine, outbox, rounds: int = 3) -> None:
    """Let anything published so far run: a committed sentinel job, ``rounds`` times over, has run
    (the worker is solo: it runs messages in the order the broker got them), and each time the
    outbox is empty. A step published by the worker after the previous round's sentinel ran is
    taken by the next round."""
    from tests.apps.celery_app import record

    for n in range(rounds):
        marker = f"sentinel-{n}"
        enqueue(engine, lambda m=marker: record.apply_async((m,)), commit=True)
        wait_for(lambda m=marker: m in services.markers(), timeout=60, message=f"{marker} to run")
        wait_for(lambda: count_rows(engine, outbox) == 0, message="an empty outbox")


def test_a_rolled_back_canvas_runs_none_of_its_steps(services, canvas_app, engine, outbox):
    """Each canvas carrying a reliable task, enqueued in a transaction that rolls back: after the
    relay and the worker have run everything committed after it, not one of its steps ran."""
    for make, _ in canvases().values():
        enqueue(engine, make, commit=False)
    assert count_rows(engine, outbox) == 0
    worker = services.worker(pool="solo", concurrency=1)
    settle(services, engine, outbox)
    ran = set(services.markers())
    leaked = {name: [m for m in markers if m in ran] for name, (_, markers) in canvases().items()}
    assert {name: steps for name, steps in leaked.items() if steps} == {}
    assert ran == {f"sentinel-{n}" for n in range(3)}
    assert count_rows(engine, outbox) == 0
    services.stop(worker)


def test_a_committed_canvas_runs_every_step_once(services, canvas_app, engine, outbox):
    """The same canvases committed: every step runs exactly once and the outbox ends empty."""
    worker = services.worker(pool="solo", concurrency=1)
    cases = canvases()
    for make, _ in cases.values():
        enqueue(engine, make, commit=True)
    expected = Counter(marker for _, markers in cases.values() for marker in markers)
    wait_for(
        lambda: set(expected) <= set(services.markers()),
        timeout=90,
        message="every step of every canvas to run",
    )
    settle(services, engine, outbox)
    ran = Counter(m for m in services.markers() if not m.startswith("sentinel-"))
    assert ran == expected
    assert count_rows(engine, outbox) == 0
    services.stop(worker)
