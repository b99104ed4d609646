"""reliable-job on the Celery app of a Django project.

With Celery's standard Django layout (``proj/celery.py`` creating the app with
``DJANGO_SETTINGS_MODULE`` set, ``proj/__init__.py`` importing it), the app is installed when Django
starts (:meth:`ReliableJobConfig.ready`): nothing to add to ``proj/celery.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.integrations.celery.app import CeleryIntegration
from reliable_job.integrations.celery.app import install as celery_install
from reliable_job.integrations.django import conf
from reliable_job.integrations.django.database import DjangoOutbox

logger = logging.getLogger(__name__)


def runtime_on(app: Any) -> CeleryIntegration | None:
    """``app``'s reliable-job runtime when it is the Django one (its outbox a :class:`DjangoOutbox`)."""
    runtime = getattr(app, "reliable_job", None)
    if isinstance(runtime, CeleryIntegration) and isinstance(runtime.database, DjangoOutbox):
        return runtime
    return None


def install(app: Any) -> CeleryIntegration:
    """Install reliable-job on ``app`` with the ``RELIABLE_JOB`` Django settings (once).

    Settings: ``RELIABLE_JOB``, then the app's Celery configuration
    (``CELERY_RELIABLE_JOB_<NAME>`` with Celery's Django layout), then ``RELIABLE_JOB_<NAME>``
    variables, then the defaults. The runtime relays every alias of the :class:`DjangoOutbox`.
    """
    existing = runtime_on(app)
    if existing is not None:
        return existing
    settings, options = conf.read(app=app)
    from reliable_job.integrations.django.misconfigured import restore

    restore(app)  # left misconfigured when Django started, valid now
    outbox = DjangoOutbox(app, settings, options)
    return celery_install(app, database=outbox, settings=settings)


def _is_django_app(app: Any) -> bool:
    """Created with ``DJANGO_SETTINGS_MODULE`` set: Celery installed its Django fixup."""
    return any(type(fixup).__name__ == "DjangoFixup" for fixup in (app._fixups or ()))


def _install_if_django(app: Any) -> None:
    if getattr(app, "reliable_job", None) is None and _is_django_app(app):
        try:
            install(app)
        except ConfigurationError as exc:  # Django starts; `manage.py check` reports it
            from reliable_job.integrations.django.misconfigured import leave_misconfigured

            leave_misconfigured(app, exc)


def on_django_ready() -> None:
    """Install on every Django-enabled Celery app, now and when one is finalized later; make
    ``delay_on_commit`` stage reliable tasks."""
    try:
        from celery import _state
    except ImportError:  # pragma: no cover - the Celery extra is not installed
        logger.debug("Celery is not installed: nothing to install reliable-job on")
        return
    _patch_on_commit()
    for app in list(_state._get_active_apps()):
        _install_if_django(app)
    _state.connect_on_app_finalize(_install_if_django)


def _is_reliable(task: Any) -> bool:
    runtime = getattr(task.app, "reliable_job", None)
    return runtime is not None and bool(runtime.is_reliable(task.name, task))


def _patch_on_commit() -> None:
    """``delay_on_commit`` / ``apply_async_on_commit`` of a reliable task stage the job now, in the
    current transaction, instead of publishing it after the commit; other tasks keep Celery's
    behaviour."""
    from celery.contrib.django.task import DjangoTask

    if getattr(DjangoTask, "_reliable_job_patched", False):
        return
    delay_on_commit = DjangoTask.delay_on_commit
    apply_async_on_commit = DjangoTask.apply_async_on_commit

    def reliable_delay_on_commit(self: Any, *args: Any, **kwargs: Any) -> None:
        if not _is_reliable(self):
            return delay_on_commit(self, *args, **kwargs)  # type: ignore[no-any-return]
        self.delay(*args, **kwargs)
        return None

    def reliable_apply_async_on_commit(self: Any, *args: Any, **kwargs: Any) -> None:
        if not _is_reliable(self):
            return apply_async_on_commit(self, *args, **kwargs)  # type: ignore[no-any-return]
        self.apply_async(*args, **kwargs)
        return None

    DjangoTask.delay_on_commit = reliable_delay_on_commit
    DjangoTask.apply_async_on_commit = reliable_apply_async_on_commit
    DjangoTask._reliable_job_patched = True
