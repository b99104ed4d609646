"""Creates the outbox table. Its columns and indexes come from ``reliable_job.schema`` (the one
definition every form of the table is rendered from); its name from ``RELIABLE_JOB["table_name"]``.
"""

from __future__ import annotations

from django.db import migrations

from reliable_job.integrations.django import conf
from reliable_job.integrations.django import schema as django_schema


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.CreateModel(
            name="OutboxJob",
            fields=django_schema.fields(),
            options=django_schema.options(conf.table_name()),
        ),
    ]
