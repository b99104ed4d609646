"""The outbox table as a Django model (fields and indexes from :mod:`reliable_job.schema`).

The model follows ``schema.py``; the table follows ``migrations/`` (frozen). They agree until
``schema.py`` changes without a new migration, which ``makemigrations --check`` reports.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from reliable_job.integrations.django import conf
from reliable_job.integrations.django import schema as django_schema


def _build() -> Any:
    attrs: dict[str, Any] = {"__module__": __name__, "__qualname__": "OutboxJob"}
    attrs.update(django_schema.fields())
    meta = dict(django_schema.options(conf.model_table_name()), app_label="reliable_job")
    attrs["Meta"] = type("Meta", (), meta)
    attrs["__str__"] = lambda self: f"{self.task_name}[{self.job_id}] {self.state}"
    return type("OutboxJob", (models.Model,), attrs)


OutboxJob = _build()
"""One staged job: the finished broker message and its state (pending, sent, dead)."""


def _build_relay() -> Any:
    attrs: dict[str, Any] = {"__module__": __name__, "__qualname__": "RelayHeartbeat"}
    attrs.update(django_schema.relay_fields())
    meta = dict(django_schema.relay_options(conf.model_table_name()), app_label="reliable_job")
    attrs["Meta"] = type("Meta", (), meta)
    attrs["__str__"] = lambda self: f"relay {self.relay_id}"
    return type("RelayHeartbeat", (models.Model,), attrs)


RelayHeartbeat = _build_relay()
"""One relay's heartbeat (``<table>_relays``): its last pass, published count, outage; written by
the relay every ``heartbeat_interval`` seconds, read by ``reliable_job status``."""
