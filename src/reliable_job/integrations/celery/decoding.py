"""Reading a stored message back for the relay: decoded and type-checked, whatever its version.

The Redis fast path slices a v2 envelope exactly as written (``message.redis_parts``) and decodes
only its routing fields (:func:`route_of`, once per distinct text); everything else (v1 rows, rows a
tool re-serialized, kombu's own path) is decoded and checked in full here. Whatever is wrong with
a row (corrupt JSON, a field of the wrong type, a newer format version) is that row's
:class:`~reliable_job.integrations.celery.message.CorruptMessage` or
:class:`~reliable_job.errors.UnknownMessageFormat`, never an error for the batch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from reliable_job.errors import UnknownMessageFormat
from reliable_job.integrations.celery import stamp
from reliable_job.integrations.celery.message import (
    _ADDED_PROPERTIES,
    PAYLOAD_END,
    CorruptMessage,
    format_version,
    json_type,
    preview,
    redis_parts,
    redis_payload,
)


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
        headers=_stamped(_field(payload, "headers", dict, "an object")),
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
        raise CorruptMessage(f'corrupt outbox message: "body_encoding" is {preview(encoding)}')
    return _Decoded(
        route=_route(doc),
        body=body,
        content_type=_field(doc, "content_type", str, "a string"),
        content_encoding=_field(doc, "content_encoding", str, "a string"),
        headers=_stamped(_field(doc, "headers", dict, "an object")),
        properties=dict(_field(doc, "properties", dict, "an object")),
        payload=None,
    )


def _stamped(headers: dict[str, Any]) -> dict[str, Any]:
    """The decoded headers, stamped in place (rows staged before the stamp existed: see
    :func:`~reliable_job.integrations.celery.message.stamped_head`)."""
    headers.setdefault(stamp.HEADER, stamp.VALUE)
    return headers


def _route(doc: object) -> Route:
    """The routing fields of a decoded envelope (v1 and v2 share them), each of its JSON type:
    a wrong one is this row's :class:`CorruptMessage`, never an error later in the batch."""
    if not isinstance(doc, dict):
        raise CorruptMessage(f"corrupt outbox message: a JSON {json_type(doc)}, not an object")
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
    return CorruptMessage(f'corrupt outbox message: "{key}" is {preview(value)}, not {expected}')


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


def task_name_of(text: str) -> str | None:
    """The task name (``task`` header) of a stored message, ``None`` when the row cannot be
    decoded. For receivers of :data:`reliable_job.signals.job_published`, which get rows, not
    task names: it decodes the whole message, a cost the relay's pass does not pay."""
    try:
        task = _decode(text).headers.get("task")
    except Exception:
        return None
    return task if isinstance(task, str) else None
