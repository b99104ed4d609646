"""Creates the outbox table: a frozen snapshot of ``reliable_job.schema`` as it was at 0.1.

Everything is written out as ``makemigrations`` wrote it (Django 5.2), so an edit of
``reliable_job/schema.py`` changes the model, not this history: ``makemigrations --check`` then
reports the change, and it needs a new migration here (plus the matching Alembic revision).

The one thing read when the migration runs is the table name, ``RELIABLE_JOB["table_name"]``
(default ``reliable_job_outbox``), and with it the names of its indexes and unique constraint.
It is fixed at the first ``migrate``: changing the setting later renames nothing in the database.
"""

from __future__ import annotations

from django.db import migrations, models

from reliable_job.integrations.django import conf

TABLE = conf.table_name()


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="OutboxJob",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        help_text="Surrogate key; claim order.", primary_key=True, serialize=False
                    ),
                ),
                (
                    "job_id",
                    models.CharField(help_text="The job's id (Celery task id).", max_length=255),
                ),
                ("task_name", models.CharField(help_text="Registered task name.", max_length=255)),
                (
                    "queue",
                    models.CharField(
                        help_text="Queue (or routing key) the job is published to.", max_length=255
                    ),
                ),
                (
                    "message",
                    models.TextField(help_text="The finished broker message, JSON (never pickle)."),
                ),
                (
                    "state",
                    models.CharField(
                        db_default="pending",
                        default="pending",
                        help_text="pending / sent / dead.",
                        max_length=16,
                    ),
                ),
                (
                    "attempts",
                    models.IntegerField(db_default=0, default=0, help_text="Publish attempts made so far."),
                ),
                (
                    "last_error",
                    models.TextField(blank=True, help_text="Last publish or task error.", null=True),
                ),
                (
                    "available_at",
                    models.DateTimeField(blank=True, help_text="Earliest next publish attempt.", null=True),
                ),
                ("created_at", models.DateTimeField(help_text="When the job was staged.")),
                (
                    "eta",
                    models.DateTimeField(
                        blank=True, help_text="When the job is due (countdown/eta), if set.", null=True
                    ),
                ),
                (
                    "sent_at",
                    models.DateTimeField(
                        blank=True, help_text="When the relay last claimed it to publish.", null=True
                    ),
                ),
                ("updated_at", models.DateTimeField(help_text="Last state change.")),
            ],
            options={
                "verbose_name": "outbox job",
                "verbose_name_plural": "outbox jobs",
                "db_table": TABLE,
                "ordering": ["id"],
                "indexes": [
                    models.Index(
                        condition=models.Q(("state", "pending")),
                        fields=["id"],
                        name=f"ix_{TABLE}_pending",
                    ),
                    models.Index(fields=["state", "sent_at"], name=f"ix_{TABLE}_state"),
                ],
                "constraints": [
                    models.UniqueConstraint(fields=("job_id",), name=f"uq_{TABLE}_job_id"),
                ],
            },
        ),
    ]
