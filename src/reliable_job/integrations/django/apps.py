"""The Django app: ``INSTALLED_APPS = [..., "reliable_job.integrations.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class ReliableJobConfig(AppConfig):
    name = "reliable_job.integrations.django"
    label = "reliable_job"
    verbose_name = "Reliable jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from reliable_job.integrations.django import checks, runtime

        checks.register_all()

        runtime.on_django_ready()
