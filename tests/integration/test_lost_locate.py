"""Where the relay finds its messages on Redis (integrations/celery/lost.py), in-process."""

from __future__ import annotations

import redis as redis_lib
from kombu.utils.json import dumps, loads

from reliable_job.integrations.celery.lost import STARTED_PREFIX, delivery_tag
from reliable_job.ports import SentRow, Whereabouts
from tests.conftest import outbox_rows, stage_records


def test_queued_restored_held_taken_started_and_missing(celery_app, engine, outbox, redis_url):
    ids = stage_records(engine, "where", 4)
    relay = celery_app.reliable_job.relay()
    assert relay.run_once() == 4
    rows = [SentRow(r["id"], r["job_id"], r["message"], r["attempts"]) for r in outbox_rows(engine, outbox)]
    client = redis_lib.Redis.from_url(redis_url)
    broker = relay.broker
    assert set(broker.locate(rows, take_over=False).values()) == {Whereabouts.QUEUED}

    # kombu's restore form: popped, then pushed back as kombu's _do_restore_message writes it
    raw = client.rpop("celery")
    message = loads(raw)
    assert message["properties"]["delivery_tag"] == delivery_tag(rows[0].id, ids[0], 1)
    channel = broker._ensure_producer().channel
    with client.pipeline() as pipe:
        channel._do_restore_message(message, "", "celery", pipe)
        pipe.execute()
    assert broker.locate(rows[:1], take_over=False)[rows[0].id] == Whereabouts.QUEUED

    # held (a worker's unacked set), started, missing
    raw = client.rpop("celery")
    assert loads(raw)["headers"]["id"] == ids[0]
    raw = client.rpop("celery")
    tag = loads(raw)["properties"]["delivery_tag"]
    client.hset("unacked", tag, dumps([loads(raw), "", "celery"]))
    client.zadd("unacked_index", {tag: 1.0})
    client.rpop("celery")
    client.set(STARTED_PREFIX + ids[2], b"1")
    found = broker.locate(rows, take_over=False)
    assert [found[r.id] for r in rows] == [
        Whereabouts.MISSING,
        Whereabouts.HELD,
        Whereabouts.STARTED,
        Whereabouts.QUEUED,
    ]
    # the backstop takes the held one from kombu, once; ignores started markers
    found = broker.locate(rows, take_over=True)
    assert [found[r.id] for r in rows] == [
        Whereabouts.MISSING,
        Whereabouts.TAKEN,
        Whereabouts.MISSING,
        Whereabouts.QUEUED,
    ]
    assert not client.hexists("unacked", tag) and client.zscore("unacked_index", tag) is None
    assert broker.locate(rows[1:2], take_over=True)[rows[1].id] == Whereabouts.MISSING
    broker.close()
    client.close()
