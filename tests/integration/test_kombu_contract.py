"""kombu's private surface that reliable-job relies on, checked against the installed kombu.

The relay's Redis fast path (``src/reliable_job/integrations/celery/redis_fast_path.py``) calls
private helpers of kombu's Redis channel to push exactly what kombu itself would (same key, same
priority queue, same binding table), kombu's path on Redis (``kombu_path.py``) runs the commands
kombu's channel hands its publish batch, staging overrides ``Producer._publish`` (``capture.py``)
and rebuilds kombu's Redis payload byte for byte (``message.py``). None of that is kombu's public
API, so ``pyproject.toml`` bounds kombu below its next minor release. Before raising that bound,
run this module on the new kombu: each check names the helper that changed and what to re-check.

The first tests need no server (signatures, and behaviour on a channel object that never
connected); the last one publishes through a real kombu connection to the test Redis.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

import kombu
import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import exchange as kombu_exchange

FAST_PATH = "src/reliable_job/integrations/celery/redis_fast_path.py (the relay's Redis fast path)"
KOMBU_PATH = "src/reliable_job/integrations/celery/kombu_path.py (kombu's publish on Redis)"
CAPTURE = "src/reliable_job/integrations/celery/capture.py"


def broken(helper: str, detail: str, where: str = FAST_PATH) -> None:
    pytest.fail(
        f"kombu {kombu.__version__}: {helper} is not what reliable-job relies on: {detail}. "
        f"Re-check {where} against this kombu before raising the kombu bound in pyproject.toml.",
        pytrace=False,
    )


def callable_as(helper: str, function: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``function`` accepts the arguments reliable-job passes (``self`` included for methods)."""
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        broken(helper, f"its signature {inspect.signature(function)} no longer takes this call ({exc})")


def bare_channel() -> kombu_redis.Channel:
    """A Redis channel object that never connected: enough for its pure helpers."""
    return kombu_redis.Channel.__new__(kombu_redis.Channel)


# -- what exists, with the call signatures reliable-job uses ----------------------------------------

ATTRIBUTES = [
    ("kombu.transport.redis.Transport", kombu_redis, "Transport"),
    ("kombu.transport.redis.Channel", kombu_redis, "Channel"),
    ("Channel._q_for_pri", kombu_redis.Channel, "_q_for_pri"),
    ("Channel._get_message_priority", kombu_redis.Channel, "_get_message_priority"),
    ("Channel.keyprefix_queue", kombu_redis.Channel, "keyprefix_queue"),
    ("Channel.sep", kombu_redis.Channel, "sep"),
    ("Channel.conn_or_acquire", kombu_redis.Channel, "conn_or_acquire"),
    ("Channel.typeof", kombu_redis.Channel, "typeof"),
    ("Channel.body_encoding", kombu_redis.Channel, "body_encoding"),
    ("Channel.default_priority", kombu_redis.Channel, "default_priority"),
    ("Channel.supports_batch_publish", kombu_redis.Channel, "supports_batch_publish"),
    ("DirectExchange.lookup", kombu_exchange.DirectExchange, "lookup"),
    ("Producer._publish", Producer, "_publish"),
]


@pytest.mark.parametrize(("helper", "owner", "name"), ATTRIBUTES, ids=[a[0] for a in ATTRIBUTES])
def test_private_names_exist(helper, owner, name):
    if not hasattr(owner, name):
        broken(helper, "it no longer exists", where_used(name))


def where_used(name: str) -> str:
    """The module that relies on kombu's ``name``."""
    if name == "_publish":
        return CAPTURE
    if name == "Channel":
        return KOMBU_PATH
    if name in ("conn_or_acquire", "supports_batch_publish"):
        return f"{FAST_PATH} and {KOMBU_PATH}"
    return FAST_PATH


def test_call_signatures():
    channel = kombu_redis.Channel
    callable_as("Channel._q_for_pri", channel._q_for_pri, None, "queue", 3)
    callable_as("Channel._get_message_priority", channel._get_message_priority, None, {"properties": {}})
    callable_as("Channel.conn_or_acquire", channel.conn_or_acquire, None)
    callable_as("Channel.typeof", channel.typeof, None, "exchange")
    callable_as(
        "DirectExchange.lookup", kombu_exchange.DirectExchange.lookup, None, [], "exchange", "key", None
    )


def test_producer_publish_takes_what_capture_overrides():
    """``CapturingProducer._publish`` replaces kombu's: kombu must still call it with these."""
    expected = [
        "self",
        "body",
        "priority",
        "content_type",
        "content_encoding",
        "headers",
        "properties",
        "routing_key",
        "mandatory",
        "immediate",
        "exchange",
        "declare",
        "timeout",
        "confirm_timeout",
        "retry",
        "retry_policy",
    ]
    names = list(inspect.signature(Producer._publish).parameters)
    if names != expected:
        broken(
            "Producer._publish",
            f"its parameters are {names}, capture.py overrides it with {expected}",
            "src/reliable_job/integrations/celery/capture.py (staging's capturing producer)",
        )


# -- how they behave on a small example (no server) ---------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "key"),
    [(0, "q"), (1, "q"), (3, "q\x06\x163"), (5, "q\x06\x163"), (6, "q\x06\x166"), (9, "q\x06\x169")],
)
def test_priority_queue_name(priority, key):
    """kombu's default priority steps (0, 3, 6, 9): a priority is rounded down to its step, and
    every step but 0 is its own list, ``<queue><sep><step>``."""
    got = bare_channel()._q_for_pri("q", priority)
    if got != key:
        broken("Channel._q_for_pri", f"priority {priority} of queue 'q' gives key {got!r}, expected {key!r}")


@pytest.mark.parametrize(
    ("properties", "expected"),
    [({"priority": 5}, 5), ({"priority": 0}, 0), ({"priority": 42}, 9), ({"priority": -1}, 0), ({}, 0)],
)
def test_message_priority(properties, expected):
    """The fast path asks the channel for a message's priority as kombu's ``_put`` does: clamped to
    0..9, the channel's default (0) when absent."""
    got = bare_channel()._get_message_priority({"properties": properties})
    if got != expected:
        broken(
            "Channel._get_message_priority",
            f"properties {properties} give priority {got!r}, expected {expected}",
        )


def test_binding_table_layout():
    """The fast path reads an exchange's bindings from the set ``keyprefix_queue % exchange``, whose
    members are ``routing_key, pattern, queue`` joined by ``sep``, and routes with the exchange
    type's ``lookup``."""
    channel = bare_channel()
    if channel.keyprefix_queue % "ex" != "_kombu.binding.ex":
        broken("Channel.keyprefix_queue", f"it is {channel.keyprefix_queue!r}")
    if channel.sep != "\x06\x16":
        broken("Channel.sep", f"it is {channel.sep!r}")
    table = [("key", "", "q1"), ("other", "", "q2"), ("key", "", "q3")]
    got = kombu_exchange.DirectExchange(None).lookup(table, "ex", "key", None)
    if set(got) != {"q1", "q3"}:
        broken("DirectExchange.lookup", f"routing 'key' over {table} gives {got!r}")


def test_channel_defaults_the_fast_path_checks():
    channel = kombu_redis.Channel
    if channel.body_encoding != "base64":
        broken("Channel.body_encoding", f"the default is {channel.body_encoding!r}, not 'base64'")
    if channel.default_priority != 0:
        broken("Channel.default_priority", f"the default is {channel.default_priority!r}, not 0")


# -- against a real Redis -------------------------------------------------------------------------


def test_live_channel_matches_the_fast_path(redis_url):
    """Publish through kombu itself, then read Redis the way the fast path does: the binding table,
    the priority queue key, the payload ending with its delivery tag, the expiring-queue map."""
    exchange = Exchange("contract-ex", type="direct")
    queue = Queue("contract-q", exchange, routing_key="contract-key")
    expiring = Queue("contract-expiring", exchange, routing_key="expiring-key", expires=60)
    with Connection(redis_url) as conn:
        if type(conn.transport) is not kombu_redis.Transport:
            broken("kombu.transport.redis.Transport", f"redis:// gives {type(conn.transport)!r}")
        producer = Producer(conn.default_channel, auto_declare=False)
        channel = producer.channel
        if not isinstance(channel, kombu_redis.Channel):
            broken("kombu.transport.redis.Channel", f"the channel is {type(channel)!r}")
        if channel.supports_batch_publish is not True:
            broken("Channel.supports_batch_publish", "False on a plain redis:// URL")
        producer.maybe_declare(queue)
        producer.maybe_declare(expiring)
        producer.publish(
            b'{"hello": 1}',
            exchange=exchange,
            routing_key="contract-key",
            priority=5,
            content_type="application/json",
            content_encoding="utf-8",
            retry=False,
        )

        if channel.typeof("contract-ex").type != "direct":
            broken("Channel.typeof", f"the declared direct exchange is {channel.typeof('contract-ex')!r}")
        expires = channel._expires
        if "contract-expiring" not in expires or "contract-q" in expires:
            broken("Channel._expires", f"declared queues give {expires!r}")

        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.smembers(channel.keyprefix_queue % "contract-ex")
            (members,) = pipe.execute()
            table = [tuple(m.decode().split(channel.sep)) for m in members]
            if ("contract-key", "", "contract-q") not in table:
                broken("Channel.keyprefix_queue / Channel.sep", f"the binding table holds {table!r}")
            routed = channel.typeof("contract-ex").lookup(table, "contract-ex", "contract-key", None)
            if set(routed) != {"contract-q"}:
                broken("DirectExchange.lookup", f"the live binding table routes to {routed!r}")

            key = channel._q_for_pri(
                "contract-q", channel._get_message_priority({"properties": {"priority": 5}})
            )
            if key != "contract-q\x06\x163":
                broken("Channel._q_for_pri", f"the key of priority 5 is {key!r}")
            stored = client.lrange(key, 0, -1)
            if len(stored) != 1:
                broken("Channel._q_for_pri", f"kombu put the message elsewhere: {client.keys('contract*')!r}")

    text = stored[0].decode()
    message = json.loads(text)
    tag = message["properties"]["delivery_tag"]
    if not text.endswith(f'"delivery_tag": "{tag}"}}}}'):
        broken(
            "the Redis payload layout",
            f"the delivery tag is no longer the payload's last field: {text[-80:]!r}",
            "src/reliable_job/integrations/celery/message.py (stored v2 payload) and redis_fast_path.py",
        )
