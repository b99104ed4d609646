"""The outbox in Django's admin: list, filters, actions (retry dead, publish now, purge dead,
discard), and a read-only view of each row.

Arguments are shown decoded by the Celery adapter (:mod:`reliable_job.integrations.celery.display`):
a JSON body's task, args, kwargs and headers; any other serializer (pickle, yaml, msgpack) as
opaque, never deserialized. The stored message itself is shown as the escaped text it is, folded
away. The actions go through the outbox's store (:class:`~reliable_job.ports.OutboxAdmin`, the
same batched, state-checked statements as ``reliable-job jobs``), so they write UTC times whatever
``USE_TZ`` and ``TIME_ZONE``; ages are read back as UTC the same way."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib import admin, messages
from django.db import connections
from django.utils.html import format_html

from reliable_job import schema
from reliable_job.cli.jobs import age as short_age
from reliable_job.integrations.celery.display import MessageView, describe_message
from reliable_job.integrations.django import conf
from reliable_job.integrations.django.models import OutboxJob
from reliable_job.ports import JobAction, JobFilter


def stored_utc(value: datetime | None, alias: str) -> datetime | None:
    """A time column as Django read it from ``alias``, as the UTC instant the outbox stored.

    The outbox stores UTC (``writer.py``); Django reads it back differently by database and
    ``USE_TZ``: PostgreSQL gives an aware value (``USE_TZ = True``) or a naive one in the session's
    zone, ``TIME_ZONE`` (``USE_TZ = False``); SQLite gives the stored UTC wall time, naive or
    labelled with the connection's zone."""
    if value is None:
        return None
    if connections[alias].vendor == "postgresql":
        if value.tzinfo is None:
            value = value.replace(tzinfo=ZoneInfo(settings.TIME_ZONE or "UTC"))
        return value.astimezone(timezone.utc)
    return value.replace(tzinfo=timezone.utc)


def _age(created_at: datetime | None, alias: str | None = None) -> str:
    """How long ago the job was staged: ``42s``, ``17m``, ``5h``, ``3d``."""
    return short_age(stored_utc(created_at, alias or _alias()))


def _alias() -> str:
    """The database the admin shows (``RELIABLE_JOB["database"]``)."""
    return conf.read()[1].database


def _outbox() -> Any:
    """The project's :class:`~reliable_job.integrations.django.database.DjangoOutbox` (the one of
    the Celery app the project imports, as ``manage.py reliable_job`` finds it)."""
    from reliable_job.integrations.django.management.commands.reliable_job import runtime_for

    return runtime_for(None).database


def _view(obj: Any) -> MessageView:
    cached: MessageView | None = getattr(obj, "_reliable_job_view", None)
    if cached is None:
        cached = describe_message(obj.message or "")
        obj._reliable_job_view = cached
    return cached


def _pre(value: object) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2, default=str)
    return format_html('<pre style="white-space: pre-wrap">{}</pre>', text)


@admin.register(OutboxJob)
class OutboxJobAdmin(admin.ModelAdmin):
    list_display = ("id", "state", "task_name", "queue", "age", "attempts", "error", "call")
    list_filter = ("state", "task_name")
    search_fields = ("job_id", "task_name")
    ordering = ("id",)
    actions = ("retry_dead", "publish_now", "purge_dead", "discard")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "job_id",
                    "task_name",
                    "queue",
                    "state",
                    "attempts",
                    "last_error",
                    "created_at",
                    "eta",
                    "available_at",
                    "sent_at",
                    "updated_at",
                )
            },
        ),
        (
            "Arguments (decoded)",
            {"fields": ("decoded_task", "decoded_args", "decoded_kwargs", "decoded_headers", "routing")},
        ),
        ("Stored message", {"classes": ("collapse",), "fields": ("stored_message",)}),
    )
    readonly_fields = tuple(f for _, options in fieldsets for f in options["fields"])

    def get_queryset(self, request: Any) -> Any:
        """Rows of the database jobs are staged in (``RELIABLE_JOB["database"]``)."""
        return super().get_queryset(request).using(conf.read()[1].database)

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: Any) -> str:
        return _age(obj.created_at, obj._state.db or _alias())

    @admin.display(description="call")
    def call(self, obj: Any) -> str:
        return _view(obj).call(60)

    @admin.display(description="task")
    def decoded_task(self, obj: Any) -> str:
        view = _view(obj)
        if view.error:
            return f"not readable: {view.error}"
        retries = view.retries
        return f"{view.task} [{view.task_id}]" + (f", Celery retry {retries}" if retries else "")

    @admin.display(description="args")
    def decoded_args(self, obj: Any) -> Any:
        view = _view(obj)
        return _pre(view.body_note) if view.body_note else _pre(view.args)

    @admin.display(description="kwargs")
    def decoded_kwargs(self, obj: Any) -> Any:
        view = _view(obj)
        if view.body_note:
            return view.body_note
        return _pre(view.kwargs if not view.embed else {**(view.kwargs or {}), "(embed)": view.embed})

    @admin.display(description="headers")
    def decoded_headers(self, obj: Any) -> Any:
        return _pre(_view(obj).headers)

    @admin.display(description="routing")
    def routing(self, obj: Any) -> str:
        view = _view(obj)
        body = f"{view.content_type}, {view.content_encoding}, {view.body_size} bytes"
        return f"exchange {view.exchange!r}, routing key {view.routing_key!r}; body {body}"

    @admin.display(description="last error")
    def error(self, obj: Any) -> str:
        text = obj.last_error or ""
        return text if len(text) <= 80 else text[:79] + "\u2026"

    @admin.display(description="message (stored JSON, as text)")
    def stored_message(self, obj: Any) -> Any:
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', obj.message)

    # -- no adding or editing: rows come from staging only --------------------------------------

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: Any) -> bool:
        return bool(request.user.has_perm("reliable_job.change_outboxjob"))

    def get_actions(self, request: Any, action_location: Any = None) -> Any:
        # action_location: Django >= 6.1 passes it; 5.2 does not know it.
        if action_location is None:
            actions = super().get_actions(request)
        else:
            actions = super().get_actions(request, action_location=action_location)
        actions.pop("delete_selected", None)  # "discard" does it without loading every row
        return actions

    def _change(self, queryset: Any, action: str, where: JobFilter) -> int:
        """``action`` on the selected rows, through the outbox's store (batched, state-checked)."""
        ids = tuple(int(pk) for pk in queryset.values_list("pk", flat=True))
        if not ids:
            return 0
        changed: int = _outbox().change_jobs(action, replace(where, ids=ids), alias=queryset.db)
        return changed

    @admin.action(description="Retry selected dead jobs", permissions=["retry"])
    def retry_dead(self, request: Any, queryset: Any) -> None:
        count = self._change(queryset, JobAction.RETRY_DEAD, JobFilter(states=(schema.DEAD,)))
        self.message_user(request, f"{count} dead job(s) back to pending.", messages.SUCCESS)

    @admin.action(description="Publish selected waiting jobs now (skip their backoff)", permissions=["retry"])
    def publish_now(self, request: Any, queryset: Any) -> None:
        count = self._change(queryset, JobAction.PUBLISH_NOW, JobFilter(waiting=True))
        self.message_user(request, f"{count} waiting job(s) due now.", messages.SUCCESS)

    @admin.action(description="Purge selected dead jobs (delete their rows)", permissions=["delete"])
    def purge_dead(self, request: Any, queryset: Any) -> None:
        count = self._change(queryset, JobAction.PURGE, JobFilter(states=(schema.DEAD,)))
        skipped = queryset.count()
        note = f" {skipped} selected job(s) not dead were kept." if skipped else ""
        self.message_user(request, f"{count} dead job(s) purged.{note}", messages.SUCCESS)

    @admin.action(description="Discard selected jobs (delete their rows)", permissions=["delete"])
    def discard(self, request: Any, queryset: Any) -> None:
        count, _ = queryset.delete()
        self.message_user(request, f"{count} job(s) discarded.", messages.SUCCESS)
