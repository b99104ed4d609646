"""Celery as reliable-job's job system: ``install(app)`` is all it takes."""

from reliable_job.integrations.celery.app import SESSION_OPTION, CeleryIntegration, install, runtime_of

__all__ = ["SESSION_OPTION", "CeleryIntegration", "install", "runtime_of"]
