"""A stored message decoded for an operator to read (``reliable-job jobs show``, the Django admin).

The envelope (v1 or v2, see :mod:`.message`) is read back by :mod:`.decoding`. The task's body is
decoded only when it is JSON (Celery's default serializer): its arguments, keyword arguments and
embedded callbacks are shown. Any other serializer (pickle, yaml, msgpack, anything else) is
shown as opaque, ``<pickle body, 123 bytes>``: never deserialized, so nothing in a row can run
code in the process that reads it. A zlib-compressed JSON body is inflated (up to
:data:`MAX_BODY`); other compressions are opaque too.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from reliable_job.errors import UnknownMessageFormat
from reliable_job.integrations.celery.decoding import _decode
from reliable_job.integrations.celery.message import CorruptMessage

JSON_TYPES = frozenset({"application/json", "application/x-json", "text/json"})
SERIALIZER_NAMES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/yaml": "yaml",
    "application/x-msgpack": "msgpack",
    "application/msgpack": "msgpack",
    "application/data": "binary",
}
MAX_BODY = 10 * 1024 * 1024
"""The largest body (after inflating) decoded for display; a bigger one is shown as opaque."""


@dataclass(frozen=True)
class MessageView:
    """What an operator sees of a stored message. ``args``/``kwargs`` are ``None`` when the body
    is not decoded (then ``body_note`` says why: opaque serializer, compression, corrupt row)."""

    task: str | None = None
    task_id: str | None = None
    exchange: str = ""
    routing_key: str = ""
    queues: tuple[str, ...] = ()
    priority: int | None = None
    content_type: str = ""
    content_encoding: str = ""
    body_size: int = 0
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    embed: dict[str, Any] | None = None
    """Protocol 2's third part: callbacks, errbacks, chain, chord (when any is set)."""
    headers: dict[str, Any] = field(default_factory=dict)
    body_note: str | None = None
    error: str | None = None
    """The row cannot be read at all (corrupt, or a newer format): the reason."""

    @property
    def retries(self) -> int | None:
        """Celery's retry count of this message (``retries`` header), if any."""
        value = self.headers.get("retries")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "task_id": self.task_id,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "queues": list(self.queues),
            "priority": self.priority,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "body_size": self.body_size,
            "args": self.args,
            "kwargs": self.kwargs,
            "embed": self.embed,
            "headers": self.headers,
            "body_note": self.body_note,
            "error": self.error,
        }

    def call(self, width: int = 80) -> str:
        """A short repr of the call, ``name('a', 1, key=2)``, cut to ``width`` characters."""
        name = (self.task or "?").rsplit(".", 1)[-1]
        if self.args is None and self.kwargs is None:
            text = f"{name}({self.body_note or self.error or '?'})"
        else:
            parts = [repr(a) for a in self.args or []]
            parts += [f"{k}={v!r}" for k, v in (self.kwargs or {}).items()]
            text = f"{name}({', '.join(parts)})"
        return text if len(text) <= width else text[: width - 1] + "\u2026"


def opaque(content_type: str, size: int) -> str:
    """``<pickle body, 123 bytes>``: how a body that is not decoded is shown."""
    name = SERIALIZER_NAMES.get(content_type.lower(), content_type or "unknown")
    return f"<{name} body, {size} bytes>"


def describe_message(text: str) -> MessageView:
    """The stored message ``text`` for display. Never raises for a bad row: a row that cannot be
    read is a view with ``error`` set."""
    try:
        decoded = _decode(text)
    except (CorruptMessage, UnknownMessageFormat) as exc:
        return MessageView(error=" ".join(str(exc).split())[:300], body_note="<not readable>")
    headers = dict(decoded.headers)
    route = decoded.route
    base: dict[str, Any] = {
        "task": _text(headers.get("task")),
        "task_id": _text(headers.get("id")),
        "exchange": route.exchange,
        "routing_key": route.routing_key,
        "queues": route.declare,
        "priority": route.priority,
        "content_type": decoded.content_type,
        "content_encoding": decoded.content_encoding,
        "body_size": len(decoded.body),
        "headers": headers,
    }
    content_type = decoded.content_type.split(";")[0].strip().lower()
    if content_type not in JSON_TYPES:
        return MessageView(**base, body_note=opaque(content_type, len(decoded.body)))
    body = decoded.body
    compression = headers.get("compression")
    if compression is not None:
        inflated = _inflate(body, compression)
        if inflated is None:
            note = f"<{compression} compressed json body, {len(body)} bytes>"
            return MessageView(**base, body_note=note)
        body = inflated
    try:
        doc = json.loads(body.decode(decoded.content_encoding or "utf-8"))
    except (ValueError, LookupError, RecursionError) as exc:
        return MessageView(
            **base, body_note=f"<json body, {len(body)} bytes: not readable: {type(exc).__name__}>"
        )
    return _with_call(base, doc, len(body))


def _with_call(base: dict[str, Any], doc: Any, size: int) -> MessageView:
    """Protocol 2 (``[args, kwargs, embed]``, task in the headers) or protocol 1 (a dict with
    ``task``, ``id``, ``args``, ``kwargs``)."""
    if isinstance(doc, list) and len(doc) == 3 and isinstance(doc[0], list) and isinstance(doc[1], dict):
        embed = doc[2] if isinstance(doc[2], dict) else None
        embed = {k: v for k, v in (embed or {}).items() if v} or None
        return MessageView(**base, args=doc[0], kwargs=doc[1], embed=embed)
    if isinstance(doc, dict) and isinstance(doc.get("task"), str):
        base = dict(base, task=doc["task"], task_id=_text(doc.get("id")) or base["task_id"])
        args, kwargs = doc.get("args"), doc.get("kwargs")
        return MessageView(
            **base,
            args=args if isinstance(args, list) else [],
            kwargs=kwargs if isinstance(kwargs, dict) else {},
        )
    return MessageView(**base, body_note=f"<json body, {size} bytes, not a Celery task message>")


def _inflate(body: bytes, compression: object) -> bytes | None:
    """A zlib body (kombu's ``zlib``, content type ``application/x-gzip``) inflated, up to
    :data:`MAX_BODY`; ``None`` for any other compression or a bigger body."""
    if compression not in ("application/x-gzip", "zlib"):
        return None
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(body, MAX_BODY)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
