"""A Django project whose reliable-job configuration is invalid still starts.

When Django starts (``ReliableJobConfig.ready``), a ``RELIABLE_JOB`` value that is wrong no longer
raises: every ``manage.py`` command would fail before the system checks could say what is wrong
(``manage.py check`` lists each problem with its id: ``checks.py``). Nothing is silently dropped
either. The Celery app is left in a state that refuses to work without a valid configuration:

- enqueuing a task that may be reliable (any task but Celery's own and those that say
  ``reliable_job=False``) raises :class:`~reliable_job.errors.ConfigurationError` naming the
  problem: it is never published around the outbox instead;
- ``celery worker`` refuses to start (a worker without reliable-job would leave staged jobs'
  rows ``sent``, to be delivered again);
- ``install(app)``, the relay and the ``reliable_job`` command read the configuration again, and
  raise.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import bootsteps

from reliable_job.errors import ConfigurationError

logger = logging.getLogger(__name__)

ATTRIBUTE = "_reliable_job_misconfigured"
"""Set on a Celery app left misconfigured: the :class:`ConfigurationError` read at start-up."""


def error_of(app: Any) -> ConfigurationError | None:
    """The configuration error ``app`` was left with at start-up, if any."""
    error = getattr(app, ATTRIBUTE, None)
    return error if isinstance(error, ConfigurationError) else None


def leave_misconfigured(app: Any, error: ConfigurationError) -> None:
    """Refuse to stage on ``app`` (and to run its workers) because of ``error``."""
    if error_of(app) is not None:
        setattr(app, ATTRIBUTE, error)
        return
    logger.warning(
        "reliable-job is not installed on Celery app %r: %s (manage.py check lists the problems)",
        getattr(app, "main", None),
        error,
    )
    setattr(app, ATTRIBUTE, error)
    original = app.send_task

    @functools.wraps(original)
    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        task = app._tasks.get(name)
        flag = getattr(task, "reliable_job", None) if task is not None else None
        if flag is False or (flag is None and name.startswith("celery.")):
            return original(name, args, kwargs, **options)
        raise ConfigurationError(
            f"cannot enqueue {name}: the reliable-job configuration is invalid: {error_of(app)} "
            "(manage.py check lists the problems)"
        )

    send_task.reliable_job_original = original  # type: ignore[attr-defined]
    app.send_task = send_task
    if RefuseToStart not in app.steps["worker"]:
        app.steps["worker"].add(RefuseToStart)


def restore(app: Any) -> None:
    """Undo :func:`leave_misconfigured` (the configuration was read again, and is valid)."""
    if error_of(app) is None:
        return
    delattr(app, ATTRIBUTE)
    original = getattr(app.send_task, "reliable_job_original", None)
    if original is not None:
        app.send_task = original


class RefuseToStart(bootsteps.Step):
    """Stops ``celery worker`` at start-up with the configuration error."""

    label = "reliable-job configuration"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        error = error_of(worker.app)
        if error is not None:
            raise ConfigurationError(f"reliable-job configuration is invalid: {error}")
