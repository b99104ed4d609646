"""The finished broker message: captured from Celery at enqueue time, stored as JSON, replayed by
the relay without re-serializing the body.

What is stored is exactly what Celery handed to kombu's ``Producer._publish`` after serialization
(and compression): body bytes, content type and encoding, headers, properties, exchange, routing
key and the queues to declare. Never pickle: the envelope is JSON, the body is text when its
encoding is UTF-8 and base64 otherwise.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from reliable_job.errors import NotSerializableError

FORMAT_VERSION = 1
_TEXT_ENCODINGS = ("utf-8", "utf8")


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
        if self.content_encoding.lower() in _TEXT_ENCODINGS:
            body, body_encoding = self.body.decode("utf-8"), "text"
        else:
            body, body_encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        doc = {
            "v": FORMAT_VERSION,
            "body": body,
            "body_encoding": body_encoding,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "headers": self.headers,
            "properties": self.properties,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "priority": self.priority,
            "mandatory": self.mandatory,
            "immediate": self.immediate,
            "declare": self.declare,
        }
        try:
            return json.dumps(doc, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise NotSerializableError(
                f"message headers or properties cannot be stored as JSON: {exc}"
            ) from exc


class CorruptMessage(ValueError):
    """A stored message the relay cannot read."""


def publish_arguments(text: str) -> tuple[bytes, dict[str, Any]]:
    """``(body, kwargs)`` for ``kombu.Producer.publish`` from a stored message."""
    try:
        doc = json.loads(text)
        if doc.get("v") != FORMAT_VERSION:
            raise CorruptMessage(f"unknown message format version {doc.get('v')!r}")
        raw = doc["body"]
        body = raw.encode("utf-8") if doc["body_encoding"] == "text" else base64.b64decode(raw)
        properties: dict[str, Any] = dict(doc["properties"])
        expiration = properties.pop("expiration", None)
        kwargs: dict[str, Any] = {
            "content_type": doc["content_type"],
            "content_encoding": doc["content_encoding"],
            "headers": doc["headers"],
            "exchange": doc["exchange"],
            "routing_key": doc["routing_key"],
            "priority": doc["priority"],
            "mandatory": doc["mandatory"],
            "immediate": doc["immediate"],
            "delivery_mode": properties.pop("delivery_mode", None),
            "expiration": int(expiration) / 1000 if expiration is not None else None,
            "declare_names": list(doc["declare"]),
            **properties,
        }
    except CorruptMessage:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptMessage(f"corrupt outbox message: {type(exc).__name__}: {exc}") from exc
    return body, kwargs


def headers_task_id(headers: Mapping[str, Any]) -> str | None:
    value = headers.get("id")
    return value if isinstance(value, str) else None
