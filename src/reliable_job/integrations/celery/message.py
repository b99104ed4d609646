"""The finished broker message: captured from Celery at enqueue time, stored as JSON, replayed by
the relay without re-serializing the body.

What is stored is exactly what Celery handed to kombu's ``Producer._publish`` after serialization
(and compression): body bytes, content type and encoding, headers, properties, exchange, routing
key and the queues to declare. Never pickle: the envelope is JSON. This module writes it;
``decoding.py`` reads it back, decoded and checked.

Every envelope, whatever its version, is a JSON object whose ``"v"`` key is its format version,
an integer. Two versions are read:

- ``v1``: written by the first reliable-job 0.1 builds, before the Redis fast relay. The body is
  text when its encoding is UTF-8 and base64 otherwise, next to the content type and encoding,
  headers, properties, exchange, routing key and queues to declare. Still written for a message
  ``v2`` cannot hold (properties kombu itself sets).
- ``v2``: written by reliable-job 0.1 (since the Redis fast relay) and later. The routing fields,
  then, as the last key, ``"payload"``: the message exactly as kombu's Redis transport puts it in
  Redis (kombu's virtual-channel message: base64 body, headers, properties with ``delivery_info``
  and ``body_encoding``), with an empty ``delivery_tag`` as its very last field. The relay's Redis
  fast path splices a fresh delivery tag in and pushes the bytes, with no decode or re-encode; any
  other transport decodes the payload back into ``Producer.publish`` arguments. Only a v2 text
  exactly as :class:`CapturedPublish` writes it is sliced (its routing fields are still decoded
  and type-checked, once per distinct text; its payload bytes are pushed as stored); any other
  text, such as a row a SQL tool re-serialized with other spacing or key order, is decoded and
  checked in full, and its payload re-serialized as kombu writes it (same JSON content).

Version policy. Producers write the envelope; relays read it. When a release changes the format:

- readers come first: a new format version is written only by a release whose relays already read
  it, so there is always one release of overlap (release N reads the new version and still writes
  the old one; release N+1 writes the new one). Upgrade every relay before any producer (README,
  "Rolling it out");
- a relay that meets a version newer than it reads (:data:`FORMAT_VERSION`) does not guess: the
  broker adapter reports :class:`~reliable_job.errors.UnknownMessageFormat` for the row, and the
  relay leaves it pending (attempts unchanged, tried again a minute later), logs it once per
  version, and keeps relaying the rest. Upgraded relays then publish it;
- a row that is not a JSON object with an integer ``"v"``, or is version 1 or 2 but malformed, is
  corrupt (:class:`CorruptMessage`): retried with backoff, then set dead with its error;
- every version ever written stays readable (rows outlive deployments: a v1 row staged before an
  upgrade is published by every later relay).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from reliable_job.errors import NotSerializableError, UnknownMessageFormat
from reliable_job.integrations.celery import stamp

FORMAT_VERSION = 2
"""The newest envelope version this release reads (and the one it writes)."""
KNOWN_VERSIONS = (1, 2)
_TEXT_ENCODINGS = ("utf-8", "utf8")

PAYLOAD_KEY = ',"payload":'
"""Separates a v2 envelope's routing fields from its Redis payload (always the last key)."""
PAYLOAD_END = '"delivery_tag": ""}}'
"""How a v2 payload ends: the empty delivery tag the relay fills in, properties, message."""
_ENVELOPE_END = PAYLOAD_END + "}"
_ADDED_PROPERTIES = ("delivery_info", "priority", "body_encoding", "delivery_tag")
"""Properties kombu's virtual channel adds to a message; Celery never sets them itself."""


@dataclass
class CapturedPublish:
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    priority: int | None = None
    mandatory: bool = False
    immediate: bool = False
    declare: list[str] = field(default_factory=list)

    @property
    def eta(self) -> datetime | None:
        """The job's due time (Celery's ``eta`` header, set by countdown/eta), if any."""
        value = self.headers.get("eta")
        if not isinstance(value, str):
            return None
        try:
            eta = datetime.fromisoformat(value)
        except ValueError:
            return None
        return eta if eta.tzinfo else eta.replace(tzinfo=timezone.utc)

    @property
    def queue(self) -> str:
        return self.declare[0] if self.declare else self.routing_key

    def to_json(self) -> str:
        """The stored envelope: v2 when the message fits it (always, for Celery's messages)."""
        try:
            if not any(key in self.properties for key in _ADDED_PROPERTIES):
                return self._to_json_v2()
            return self._to_json_v1()
        except (TypeError, ValueError) as exc:
            raise NotSerializableError(
                f"message headers or properties cannot be stored as JSON: {exc}"
            ) from exc

    def _to_json_v1(self) -> str:
        if self.content_encoding.lower() in _TEXT_ENCODINGS:
            body, body_encoding = self.body.decode("utf-8"), "text"
        else:
            body, body_encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        doc = {
            "v": 1,
            "body": body,
            "body_encoding": body_encoding,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "headers": self.headers,
            "properties": self.properties,
            **self._route_fields(),
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    def _route_fields(self) -> dict[str, Any]:
        """Where the message goes: the same fields, in the same order, in v1 and v2."""
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "priority": self.priority,
            "mandatory": self.mandatory,
            "immediate": self.immediate,
            "declare": self.declare,
        }

    def _to_json_v2(self) -> str:
        key = (self.exchange, self.routing_key, self.priority, self.mandatory, self.immediate, *self.declare)
        head = _HEADS.get(key)
        if head is None:  # the routing fields of a task's messages rarely change: encoded once
            head = _COMPACT_JSON.encode({"v": 2, **self._route_fields()})
            if len(_HEADS) < _MAX_HEADS:
                _HEADS[key] = head
        payload = redis_payload(
            self.body,
            self.priority,
            self.content_type,
            self.content_encoding,
            self.headers,
            self.properties,
            self.exchange,
            self.routing_key,
        )
        if not payload.endswith(PAYLOAD_END):  # pragma: no cover - kombu's layout is fixed
            return self._to_json_v1()
        return f"{head[:-1]}{PAYLOAD_KEY}{payload}}}"


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""``json.dumps(value, separators=(",", ":"), allow_nan=False)``, its encoder made once."""
_KOMBU_JSON = json.JSONEncoder(allow_nan=False)
"""``json.dumps(value, allow_nan=False)`` (kombu's layout), its encoder made once."""
_HEADS: dict[tuple[Any, ...], str] = {}
"""A v2 envelope's routing fields as encoded, by their values."""
_MAX_HEADS = 1024


def redis_payload(
    body: bytes,
    priority: int | None,
    content_type: str,
    content_encoding: str,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    exchange: str,
    routing_key: str,
    delivery_tag: str = "",
) -> str:
    """The message as kombu's Redis transport pushes it, with ``delivery_tag``.

    kombu's virtual channel builds it in ``prepare_message`` (delivery_info, priority defaulting
    to 0) and ``basic_publish`` (base64 body, body_encoding, delivery_tag, then exchange and
    routing key in delivery_info), and serializes it with ``kombu.utils.json.dumps``: for JSON
    values that is ``json.dumps`` with its default separators. Built in the same order, the text
    is byte for byte the same. Values JSON cannot hold raise ``TypeError``/``ValueError``.
    """
    props = dict(properties)
    props.setdefault("delivery_info", {})
    props.setdefault("priority", priority or 0)
    props["body_encoding"] = "base64"
    props["delivery_tag"] = delivery_tag
    props["delivery_info"] = dict(props["delivery_info"], exchange=exchange, routing_key=routing_key)
    message = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": dict(headers) if headers else {},
        "properties": props,
    }
    return _KOMBU_JSON.encode(message)


class CorruptMessage(ValueError):
    """A stored message the relay cannot read."""


def format_version(doc: object) -> int:
    """The format version of a decoded envelope: 1 or 2.

    Raises :class:`~reliable_job.errors.UnknownMessageFormat` for an integer version newer than
    :data:`FORMAT_VERSION` (a newer release wrote it), :class:`CorruptMessage` for anything else.
    """
    if not isinstance(doc, dict):
        raise CorruptMessage(f"corrupt outbox message: a JSON {json_type(doc)}, not an object")
    version = doc.get("v")
    if isinstance(version, int) and not isinstance(version, bool):
        if version in KNOWN_VERSIONS:
            return version
        if version > FORMAT_VERSION:
            raise UnknownMessageFormat(version)
    raise CorruptMessage(f"unknown message format version {preview(version)}")


def redis_parts(text: str) -> tuple[str, str] | None:
    """``(routing fields JSON, payload head)`` of a v2 envelope, by slicing, without decoding.

    The Redis payload is ``head + delivery_tag + '"}}'``. ``None`` for anything that is not a v2
    envelope exactly as :class:`CapturedPublish` writes it (v1 rows, rows a tool re-serialized,
    corrupt rows): those take ``redis_parts_of_any`` or ``publish_arguments`` (``decoding.py``),
    which decode and check them. A JSON string never holds an unescaped ``"``, so the first
    ``,"payload":`` is the key.
    """
    if not (text.startswith('{"v":2,') and text.endswith(_ENVELOPE_END)):
        return None
    split = text.find(PAYLOAD_KEY)
    if split < 0:
        return None
    return text[:split] + "}", stamped_head(text[split + len(PAYLOAD_KEY) : -4])


_STAMP_TEXT = f'"{stamp.HEADER}": {stamp.VALUE}'
_HEADERS_KEY = '"headers": {'


def stamped_head(head: str) -> str:
    """A v2 payload head whose headers carry the stamp (:mod:`.stamp`).

    Staging stamps every message; rows staged before the stamp existed (reliable-job 0.1.0) are
    stamped here as they are relayed, so the workers complete them. Text, not JSON: the stamp is
    looked for, then spliced in after the first ``"headers": {`` (the payload's: the body before it
    is base64, and a JSON string never holds an unescaped ``"``).
    """
    if _STAMP_TEXT in head:
        return head
    at = head.find(_HEADERS_KEY)
    if at < 0:  # pragma: no cover - kombu always writes headers
        return head
    at += len(_HEADERS_KEY)
    return head[:at] + _STAMP_TEXT + ("" if head.startswith("}", at) else ", ") + head[at:]


def json_type(value: object) -> str:
    """A value's JSON type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def preview(value: object) -> str:
    """A value for an error message: its JSON type and at most 40 characters of it."""
    text = repr(value)
    return f"{json_type(value)} {text[:40]}{'...' if len(text) > 40 else ''}"
