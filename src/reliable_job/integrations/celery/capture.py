"""A kombu producer that records the message Celery would publish instead of sending it."""

from __future__ import annotations

from typing import Any

from kombu import Producer, Queue

from reliable_job.integrations.celery.message import CapturedPublish


class CapturingProducer(Producer):  # type: ignore[misc]
    """Runs all of Celery's and kombu's message preparation, then keeps the result.

    Only the first publish is kept: that is the task message. Anything Celery publishes after it
    through the same producer (the optional ``task-sent`` monitoring event) is dropped.
    """

    captured: CapturedPublish | None = None

    def _publish(
        self,
        body: bytes,
        priority: int | None,
        content_type: str,
        content_encoding: str,
        headers: dict[str, Any],
        properties: dict[str, Any],
        routing_key: str,
        mandatory: bool,
        immediate: bool,
        exchange: str,
        declare: list[Any],
        timeout: float | None = None,
        confirm_timeout: float | None = None,
        retry: bool = False,
        retry_policy: dict[str, Any] | None = None,
    ) -> None:
        if self.captured is not None:
            return
        if isinstance(body, str):  # pragma: no cover - kombu always hands bytes here
            body = body.encode(content_encoding or "utf-8")
        self.captured = CapturedPublish(
            body=bytes(body),
            content_type=content_type,
            content_encoding=content_encoding,
            headers=dict(headers),
            properties=dict(properties),
            exchange=exchange or "",
            routing_key=routing_key or "",
            priority=priority,
            mandatory=mandatory,
            immediate=immediate,
            declare=[entity.name for entity in declare or () if isinstance(entity, Queue)],
        )
