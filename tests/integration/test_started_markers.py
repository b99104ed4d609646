"""The worker's started markers are written off the task's path (integrations/celery/markers.py):
batched into one pipeline, in order, by a thread of the process that made them, and written at
worker shutdown (real Redis)."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import redis as redis_lib

from reliable_job.integrations.celery import markers
from reliable_job.integrations.celery.markers import EXPIRE, SET, MarkerWriter


@pytest.fixture
def client(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_markers_wait_in_the_buffer_and_go_in_one_pipeline(client):
    writer = MarkerWriter(interval=3600.0, batch=10_000)
    for i in range(50):
        writer.add(client, SET, f"m.{i}", 300)
    assert client.exists("m.0") == 0, "nothing is written on the task's path"
    assert len(writer.pending()) == 50
    assert writer.flush() == 50
    assert writer.pipelines == 1
    assert writer.pending() == []
    assert client.exists(*[f"m.{i}" for i in range(50)]) == 50
    assert 0 < client.ttl("m.49") <= 300
    writer.close()


def test_the_thread_writes_them_by_itself(client):
    writer = MarkerWriter(interval=0.02)
    writer.add(client, SET, "alone", 300)
    thread = writer.writer_thread
    assert thread is not None and thread.daemon
    assert _until(lambda: client.exists("alone") == 1)
    writer.close()
    assert not thread.is_alive()


def test_a_full_batch_is_written_without_waiting_for_the_interval(client):
    writer = MarkerWriter(interval=3600.0, batch=20)
    for i in range(20):
        writer.add(client, SET, f"b.{i}", 300)
    assert _until(lambda: client.exists("b.19") == 1)
    writer.close()


def test_a_jobs_expire_never_overtakes_its_set_nor_a_shorter_set_a_longer_one(client):
    """One job's start then end: the marker ends up short. A retry's longer SET after the start's:
    the marker ends up long. Whether the thread or an explicit flush writes them."""
    for interval in (3600.0, 0.0, 0.001):
        client.flushdb()
        writer = MarkerWriter(interval=interval, batch=3)
        for i in range(30):  # several pipelines when the thread runs
            writer.add(client, SET, f"job.{i}", 86400)
            writer.add(client, EXPIRE, f"job.{i}", 120)
            writer.add(client, SET, f"retry.{i}", 100)
            writer.add(client, SET, f"retry.{i}", 5000)
        writer.close()
        for i in range(30):
            assert 0 < client.ttl(f"job.{i}") <= 120, interval
            assert client.ttl(f"retry.{i}") > 100, interval


def test_shutdown_writes_what_is_left_and_later_markers_go_at_once(client, monkeypatch):
    """``worker_shutdown``/``worker_process_shutdown`` (the completion flush handler) writes the
    buffered markers of the process."""
    from reliable_job.integrations.celery import worker

    writer = MarkerWriter(interval=3600.0)
    monkeypatch.setattr(markers, "writer", writer)
    writer.add(client, SET, "left", 300)
    thread = writer.writer_thread
    assert client.exists("left") == 0
    worker._flush_completions()
    assert client.exists("left") == 1
    assert thread is not None and not thread.is_alive()
    writer.add(client, SET, "after", 300)  # closed: written at once
    assert client.exists("after") == 1


def test_a_forked_child_has_its_own_buffer_and_thread(client, redis_url):
    """A prefork child never writes (nor holds) its parent's markers and starts its own thread."""
    writer = MarkerWriter(interval=3600.0)
    writer.add(client, SET, "parent", 300)
    parent_thread = writer.writer_thread
    assert parent_thread is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        pid = os.fork()
    if pid == 0:  # the child: exit without running any cleanup
        code = 10
        try:
            child_client = redis_lib.Redis.from_url(redis_url)
            assert writer.pending() == [], "inherited the parent's markers"
            assert writer.writer_thread is None, "inherited the parent's thread"
            writer.add(child_client, SET, "child", 300)
            thread = writer.writer_thread
            assert thread is not None and thread is not parent_thread and thread.is_alive()
            writer.close()
            assert child_client.exists("child") == 1
            assert child_client.exists("parent") == 0, "wrote its parent's markers"
            code = 0
        except AssertionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert writer.writer_thread is parent_thread and parent_thread.is_alive()
    assert writer.pending() == [("set", "parent", 300)]
    writer.close()
    assert client.exists("parent") == 1
