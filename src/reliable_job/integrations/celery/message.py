"""The finished broker message: captured from Celery at enqueue time, stored as JSON, replayed by
the relay without re-serializing the body.

What is stored is exactly what Celery handed to kombu's ``Producer._publish`` after serialization
(and compression): body bytes, content type and encoding, headers, properties, exchange, routing
key and the queues to declare. Never pickle: the envelope is JSON.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from reliable_job.errors import NotSerializableError, UnknownMessageFormat

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
        route = {"v": 2, **self._route_fields()}
        head = json.dumps(route, separators=(",", ":"), allow_nan=False)
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
    return json.dumps(message, allow_nan=False)


class CorruptMessage(ValueError):
    """A stored message the relay cannot read."""


def format_version(doc: object) -> int:
    """The format version of a decoded envelope: 1 or 2.

    Raises :class:`~reliable_job.errors.UnknownMessageFormat` for an integer version newer than
    :data:`FORMAT_VERSION` (a newer release wrote it), :class:`CorruptMessage` for anything else.
    """
    if not isinstance(doc, dict):
        raise CorruptMessage(f"corrupt outbox message: a JSON {_json_type(doc)}, not an object")
    version = doc.get("v")
    if isinstance(version, int) and not isinstance(version, bool):
        if version in KNOWN_VERSIONS:
            return version
        if version > FORMAT_VERSION:
            raise UnknownMessageFormat(version)
    raise CorruptMessage(f"unknown message format version {_preview(version)}")


@dataclass(frozen=True)
class Route:
    """Where a stored message goes: what the relay's Redis fast path needs besides the payload."""

    exchange: str
    routing_key: str
    priority: int | None
    declare: tuple[str, ...]
    mandatory: bool = False
    immediate: bool = False


def route_of(route_json: str) -> Route:
    """The :class:`Route` of a v2 envelope's routing fields (see :func:`redis_parts`)."""
    return _guarded(lambda: _route(_loads(route_json)))


def redis_parts(text: str) -> tuple[str, str] | None:
    """``(routing fields JSON, payload head)`` of a v2 envelope, by slicing, without decoding.

    The Redis payload is ``head + delivery_tag + '"}}'``. ``None`` for anything that is not a v2
    envelope exactly as :class:`CapturedPublish` writes it (v1 rows, rows a tool re-serialized,
    corrupt rows): those take :func:`redis_parts_of_any` or :func:`publish_arguments`, which
    decode and check them. A JSON string never holds an unescaped ``"``, so the first
    ``,"payload":`` is the key.
    """
    if not (text.startswith('{"v":2,') and text.endswith(_ENVELOPE_END)):
        return None
    split = text.find(PAYLOAD_KEY)
    if split < 0:
        return None
    return text[:split] + "}", text[split + len(PAYLOAD_KEY) : -4]


@dataclass(frozen=True)
class _Decoded:
    """A stored message decoded and type-checked, whatever its version."""

    route: Route
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    """The message's own properties (without those kombu's virtual channel adds)."""
    payload: dict[str, Any] | None
    """v2: the stored Redis payload, as decoded."""


def publish_arguments(text: str) -> tuple[bytes, dict[str, Any]]:
    """``(body, kwargs)`` for ``kombu.Producer.publish`` from a stored message (v1 or v2)."""
    decoded = _decode(text)

    def arguments() -> dict[str, Any]:
        properties = dict(decoded.properties)
        expiration = properties.pop("expiration", None)
        route = decoded.route
        return {
            "content_type": decoded.content_type,
            "content_encoding": decoded.content_encoding,
            "headers": decoded.headers,
            "exchange": route.exchange,
            "routing_key": route.routing_key,
            "priority": route.priority,
            "mandatory": route.mandatory,
            "immediate": route.immediate,
            "delivery_mode": properties.pop("delivery_mode", None),
            "expiration": int(expiration) / 1000 if expiration is not None else None,
            "declare_names": list(route.declare),
            **properties,
        }

    return decoded.body, _guarded(arguments)


def redis_parts_of_any(text: str) -> tuple[Route, str]:
    """``(route, payload head)`` for any stored message: sliced from a v2 envelope as written,
    else decoded and checked: the v2 payload re-serialized as kombu writes it (a row a tool
    re-serialized gives the same JSON content the fast path pushes), a v1 payload rebuilt."""
    parts = redis_parts(text)
    if parts is not None:
        return route_of(parts[0]), parts[1]
    decoded = _decode(text)

    def payload() -> str:
        if decoded.payload is None:  # v1
            route = decoded.route
            return redis_payload(
                decoded.body,
                route.priority,
                decoded.content_type,
                decoded.content_encoding,
                decoded.headers,
                decoded.properties,
                route.exchange,
                route.routing_key,
            )
        message = {k: v for k, v in decoded.payload.items() if k != "properties"}
        properties = {k: v for k, v in decoded.payload["properties"].items() if k != "delivery_tag"}
        message["properties"] = dict(properties, delivery_tag="")  # the last key, as kombu's
        return json.dumps(message, allow_nan=False)

    text = _guarded(payload)
    if not text.endswith(PAYLOAD_END):  # pragma: no cover - built above with the tag last
        raise CorruptMessage("corrupt outbox message: payload without a delivery tag")
    return decoded.route, text[:-3]


def _decode(text: str) -> _Decoded:
    """Decode and type-check a stored message (any version); per-row errors only:
    :class:`CorruptMessage` or :class:`~reliable_job.errors.UnknownMessageFormat`."""
    doc = _guarded(lambda: _loads(text))
    version = format_version(doc)
    return _guarded(lambda: _decode_v2(doc) if version == 2 else _decode_v1(doc))


def _decode_v2(doc: dict[str, Any]) -> _Decoded:
    payload = _field(doc, "payload", dict, "an object")
    properties = _field(payload, "properties", dict, "an object")
    if properties.get("body_encoding") != "base64":
        raise CorruptMessage("v2 message without a base64 body")
    _field(properties, "delivery_info", dict, "an object", optional=True)
    return _Decoded(
        route=_route(doc),
        body=base64.b64decode(_field(payload, "body", str, "a string")),
        content_type=_field(payload, "content-type", str, "a string"),
        content_encoding=_field(payload, "content-encoding", str, "a string"),
        headers=_field(payload, "headers", dict, "an object"),
        properties={k: v for k, v in properties.items() if k not in _ADDED_PROPERTIES},
        payload=payload,
    )


def _decode_v1(doc: dict[str, Any]) -> _Decoded:
    raw = _field(doc, "body", str, "a string")
    encoding = doc.get("body_encoding")
    if encoding == "text":
        body = raw.encode("utf-8")
    elif encoding == "base64":
        body = base64.b64decode(raw)
    else:
        raise CorruptMessage(f'corrupt outbox message: "body_encoding" is {_preview(encoding)}')
    return _Decoded(
        route=_route(doc),
        body=body,
        content_type=_field(doc, "content_type", str, "a string"),
        content_encoding=_field(doc, "content_encoding", str, "a string"),
        headers=_field(doc, "headers", dict, "an object"),
        properties=dict(_field(doc, "properties", dict, "an object")),
        payload=None,
    )


def _route(doc: object) -> Route:
    """The routing fields of a decoded envelope (v1 and v2 share them), each of its JSON type:
    a wrong one is this row's :class:`CorruptMessage`, never an error later in the batch."""
    if not isinstance(doc, dict):
        raise CorruptMessage(f"corrupt outbox message: a JSON {_json_type(doc)}, not an object")
    priority = doc.get("priority", _MISSING)
    if priority is _MISSING or not (priority is None or _is_int(priority)):
        raise _wrong("priority", priority, "an integer or null")
    declare = _field(doc, "declare", list, "a list of strings")
    if not all(isinstance(name, str) for name in declare):
        raise _wrong("declare", declare, "a list of strings")
    return Route(
        exchange=_field(doc, "exchange", str, "a string"),
        routing_key=_field(doc, "routing_key", str, "a string"),
        priority=priority,
        declare=tuple(declare),
        mandatory=_flag(doc, "mandatory"),
        immediate=_flag(doc, "immediate"),
    )


def _flag(doc: Mapping[str, Any], key: str) -> bool:
    """``mandatory``/``immediate``: a boolean (null, as a caller may pass it, reads as false)."""
    value = doc.get(key, _MISSING)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong(key, value, "true, false or null")
    return value


_MISSING: Any = object()


def _field(doc: Mapping[str, Any], key: str, kind: type, expected: str, *, optional: bool = False) -> Any:
    value = doc.get(key, _MISSING)
    if optional and value is _MISSING:
        return None
    if value is _MISSING or not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _wrong(key, value, expected)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wrong(key: str, value: object, expected: str) -> CorruptMessage:
    if value is _MISSING:
        return CorruptMessage(f'corrupt outbox message: no "{key}"')
    return CorruptMessage(f'corrupt outbox message: "{key}" is {_preview(value)}, not {expected}')


def _json_type(value: object) -> str:
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


def _preview(value: object) -> str:
    """A value for an error message: its JSON type and at most 40 characters of it."""
    text = repr(value)
    return f"{_json_type(value)} {text[:40]}{'...' if len(text) > 40 else ''}"


def _loads(text: str) -> Any:
    return json.loads(text)


_T = TypeVar("_T")


def _guarded(step: Callable[[], _T]) -> _T:
    """Run a decoding step; whatever goes wrong in it is the row's :class:`CorruptMessage` (or
    :class:`~reliable_job.errors.UnknownMessageFormat`), never an error for the batch."""
    try:
        return step()
    except (CorruptMessage, UnknownMessageFormat):
        raise
    except Exception as exc:  # JSON, base64, types, depth (RecursionError), huge numbers
        raise CorruptMessage(f"corrupt outbox message: {type(exc).__name__}: {exc}"[:500]) from exc


def headers_task_id(headers: Mapping[str, Any]) -> str | None:
    value = headers.get("id")
    return value if isinstance(value, str) else None
