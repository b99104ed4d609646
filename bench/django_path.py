"""The Django path of the enqueue figure: the request transaction as a Django view does it.

(a) ``direct``: ``transaction.atomic()`` creating one ``Order``, then ``.delay()`` of a plain task
    straight to Redis after the commit (what ``delay_on_commit`` does);
(b) ``staged``: ``transaction.atomic()`` creating the ``Order`` and ``.delay()`` of a reliable task,
    staged by the Django integration on Django's connection, in the same transaction.

Django is configured in-process from :mod:`bench.django_settings` (the bench's PostgreSQL); the
Celery app here is a second one, installed with the Django integration
(:func:`reliable_job.integrations.django.runtime.install`), on the bench's Redis database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SETTINGS = "bench.django_settings"


@dataclass
class DjangoPath:
    app: Any
    reliable: Any
    plain: Any
    order: Any

    def direct(self, tasks: int, delay_us: list[float]) -> Callable[[int], None]:
        """A request: ``atomic()`` creating the order, then ``tasks`` direct ``.delay()`` calls
        (their time is added to ``delay_us[0]``)."""
        from django.db import transaction

        order, plain = self.order, self.plain

        def run(i: int) -> None:
            with transaction.atomic():
                order.objects.create(v="order")
            t0 = time.perf_counter()
            for j in range(tasks):
                plain.delay(i, j)
            delay_us[0] += (time.perf_counter() - t0) * 1e6

        return run

    def staged(self, tasks: int, delay_us: list[float]) -> Callable[[int], None]:
        """A request: ``atomic()`` creating the order and staging ``tasks`` reliable jobs."""
        from django.db import transaction

        order, reliable = self.order, self.reliable

        def run(i: int) -> None:
            with transaction.atomic():
                order.objects.create(v="order")
                t0 = time.perf_counter()
                for j in range(tasks):
                    reliable.delay(i, j)
                delay_us[0] += (time.perf_counter() - t0) * 1e6

        return run

    def close(self) -> None:
        from django.db import connections

        with connections["default"].schema_editor() as editor:
            editor.delete_model(self.order)
        connections.close_all()
        self.app.reliable_job.database.close()


def setup(broker_url: str) -> DjangoPath:
    """Configure Django (once per process), create the ``Order`` table, build the Celery app."""
    import django
    from django.apps import apps

    if not apps.ready:
        previous = os.environ.get("DJANGO_SETTINGS_MODULE")
        os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
        try:
            django.setup()
        finally:
            if previous is None:
                del os.environ["DJANGO_SETTINGS_MODULE"]
            else:
                os.environ["DJANGO_SETTINGS_MODULE"] = previous
    from celery import Celery
    from django.db import connections

    from bench.app import QUEUE
    from bench.djangoshop.models import Order
    from reliable_job.integrations.django.runtime import install

    app = Celery("bench_django", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE, task_ignore_result=True, broker_connection_retry_on_startup=True
    )

    @app.task(name="bench.django_reliable_noop", reliable_job=True)
    def reliable_noop(*args: Any) -> None:
        """Staged through Django."""

    @app.task(name="bench.django_plain_noop", reliable_job=False)
    def plain_noop(*args: Any) -> None:
        """Published directly."""

    install(app)
    with connections["default"].schema_editor() as editor:
        editor.execute(f"DROP TABLE IF EXISTS {Order._meta.db_table}")
        editor.create_model(Order)
    return DjangoPath(app, reliable_noop, plain_noop, Order)
