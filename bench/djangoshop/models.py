"""The user's model of the Django enqueue figure (its table is created and dropped by the bench,
no migrations)."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    v = models.CharField(max_length=20)

    class Meta:
        app_label = "djangoshop"
        db_table = "bench_django_orders"
