"""reliable-job's settings in Celery's own configuration: ``app.conf.reliable_job_<name>``.

Any setting of :class:`~reliable_job.settings.Settings` can be set where the app's other settings
are: ``app.conf.update(reliable_job_batch_size=100)``, a ``celeryconfig`` module, or, with
``config_from_object("django.conf:settings", namespace="CELERY")``, a Django setting
``CELERY_RELIABLE_JOB_BATCH_SIZE`` (Celery looks a namespaced key up as the namespace, an
underscore and the key in upper case, as it does for its own settings).

Strings are parsed like ``RELIABLE_JOB_*`` variables; any other value is taken as it is. A
``reliable_job_*`` key that names no setting is an error: a typo must not pass silently.
"""

from __future__ import annotations

from typing import Any

from reliable_job.errors import ConfigurationError
from reliable_job.settings import Settings

KEY_PREFIX = "reliable_job_"


def conf_key(app: Any, name: str) -> str:
    """The key of setting ``name`` as the user writes it in the app's configuration."""
    namespace = _namespace(app)
    key = KEY_PREFIX + name
    return (namespace + key).upper() if namespace else key


def read_conf(app: Any) -> dict[str, object]:
    """The settings set in ``app``'s configuration, by setting name.

    Reads (and so finalizes) ``app.conf``: configure the app before installing reliable-job.
    Raises :class:`~reliable_job.errors.ConfigurationError` naming a ``reliable_job_*`` key that
    is no setting.
    """
    conf = app.conf
    names = set(Settings.names())
    namespace = _namespace(app)
    values: dict[str, object] = {}
    for key in list(conf.keys()):
        if not isinstance(key, str):
            continue
        if namespace and key.upper().startswith(namespace.upper()):
            rest = key[len(namespace) :]
        elif key == key.lower():  # a key set without the namespace (app.conf.update(...))
            rest = key
        else:
            continue
        if not rest.lower().startswith(KEY_PREFIX):
            continue
        name = rest.lower()[len(KEY_PREFIX) :]
        if name not in names:
            raise ConfigurationError(
                f"unknown reliable-job setting in the Celery configuration: {key} "
                f"(settings: {', '.join(KEY_PREFIX + n for n in sorted(names))})"
            )
        value = conf.get(KEY_PREFIX + name)
        if value is not None:
            values[name] = value
    return values


def load_settings(app: Any, code: dict[str, Any] | None = None) -> Settings:
    """``app``'s settings: ``code`` (keyword arguments of ``install``, Django's ``RELIABLE_JOB``),
    then the app's configuration, then ``RELIABLE_JOB_*`` variables, then the defaults."""
    return Settings.load(config=read_conf(app), config_key=lambda name: conf_key(app, name), code=code)


def _namespace(app: Any) -> str:
    namespace = getattr(app, "namespace", None)
    return namespace.rstrip("_") + "_" if namespace else ""
