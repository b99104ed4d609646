"""Django as reliable-job's database layer: add ``"reliable_job.integrations.django"`` to
``INSTALLED_APPS``, configure ``RELIABLE_JOB = {...}`` and run ``manage.py migrate``.

Reliable Celery tasks enqueued inside ``transaction.atomic()`` are then staged in that transaction,
on the connection of the configured database alias, with nothing passed at the call site.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install"]


def install(app: Any) -> Any:
    """Install reliable-job on a Celery app with the ``RELIABLE_JOB`` Django settings.

    Not needed with Celery's standard Django layout (the app is found and installed when Django
    starts); call it for a Celery app created without ``DJANGO_SETTINGS_MODULE`` set.
    """
    from reliable_job.integrations.django.runtime import install as _install

    return _install(app)
