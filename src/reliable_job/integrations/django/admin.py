"""The outbox in Django's admin: list, filters, retry dead / discard actions, and a read-only view
of each row. The stored message is shown as the text it is: never decoded, loaded or executed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from django.contrib import admin, messages
from django.utils.html import format_html

from reliable_job import schema
from reliable_job.integrations.django import conf
from reliable_job.integrations.django.models import OutboxJob


def _age(created_at: datetime | None) -> str:
    if created_at is None:
        return "-"
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=timezone.utc)
    seconds = max(0, int((datetime.now(timezone.utc) - created_at).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@admin.register(OutboxJob)
class OutboxJobAdmin(admin.ModelAdmin):
    list_display = ("id", "state", "task_name", "queue", "age", "attempts", "error")
    list_filter = ("state", "task_name")
    search_fields = ("job_id", "task_name")
    ordering = ("id",)
    actions = ("retry_dead", "discard")
    fields = (
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
        "stored_message",
    )
    readonly_fields = fields

    def get_queryset(self, request: Any) -> Any:
        """Rows of the database jobs are staged in (``RELIABLE_JOB["database"]``)."""
        return super().get_queryset(request).using(conf.read()[1].database)

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: Any) -> str:
        return _age(obj.created_at)

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

    @admin.action(description="Retry selected dead jobs", permissions=["retry"])
    def retry_dead(self, request: Any, queryset: Any) -> None:
        count = queryset.filter(state=schema.DEAD).update(
            state=schema.PENDING,
            attempts=0,
            available_at=None,
            updated_at=datetime.now(timezone.utc),
        )
        self.message_user(request, f"{count} dead job(s) back to pending.", messages.SUCCESS)

    @admin.action(description="Discard selected jobs (delete their rows)", permissions=["delete"])
    def discard(self, request: Any, queryset: Any) -> None:
        count, _ = queryset.delete()
        self.message_user(request, f"{count} job(s) discarded.", messages.SUCCESS)
