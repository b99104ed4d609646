"""Creates the relays' heartbeat table ``<table>_relays``: a frozen snapshot of
``reliable_job.schema.RELAY_COLUMNS`` as ``makemigrations`` wrote it (Django 5.2).

As in ``0001_initial``, the one thing read when it runs is the table name
(``RELIABLE_JOB["table_name"]``).
"""

from __future__ import annotations

from django.db import migrations, models

from reliable_job.integrations.django import conf

TABLE = conf.table_name()


class Migration(migrations.Migration):
    dependencies = [
        ("reliable_job", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="RelayHeartbeat",
            fields=[
                (
                    "relay_id",
                    models.CharField(
                        help_text="host:pid:random, one per relay (primary key).",
                        max_length=255,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                ("started_at", models.DateTimeField(help_text="When the relay started.")),
                (
                    "last_pass_at",
                    models.DateTimeField(blank=True, help_text="End of its last successful pass.", null=True),
                ),
                ("beat_at", models.DateTimeField(help_text="When the relay last wrote this row.")),
                (
                    "published",
                    models.IntegerField(
                        db_default=0, default=0, help_text="Jobs it published since it started."
                    ),
                ),
                (
                    "listening",
                    models.IntegerField(
                        db_default=0, default=0, help_text="1 while it listens for wake-ups, else 0."
                    ),
                ),
                (
                    "outage_since",
                    models.DateTimeField(
                        blank=True, help_text="Broker or database unreachable since.", null=True
                    ),
                ),
            ],
            options={
                "verbose_name": "relay",
                "verbose_name_plural": "relays",
                "db_table": f"{TABLE}_relays",
                "ordering": ["relay_id"],
            },
        ),
    ]
