from django.db import models


class Execution(models.Model):
    """One run of a test task (always written to the default database)."""

    task_id = models.CharField(max_length=255)
    marker = models.CharField(max_length=255)
