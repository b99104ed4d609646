"""The example project's settings, pointed at the test servers, with two more databases.

Used in-process by ``tests/django/conftest.py`` and by the ``celery -A proj worker`` and
``manage.py`` subprocesses the tests start (``DJANGO_SETTINGS_MODULE=tests.django.settings``).

- ``default``: PostgreSQL database ``rj_dj_default`` (the example's ``shop`` app and the outbox);
- ``other``: PostgreSQL database ``rj_dj_other`` (a second outbox, for per-task aliases);
- ``sqlite``: the SQLite file ``$RJ_DJ_SQLITE`` (a third outbox, on SQLite).

Test database names equal the names, so the subprocesses use the databases pytest-django creates.
"""

import os
from urllib.parse import urlsplit

from proj.settings import *  # noqa: F403

_pg = urlsplit(os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"])


def _postgres(name):
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": _pg.username or "",
        "PASSWORD": _pg.password or "",
        "HOST": _pg.hostname or "",
        "PORT": str(_pg.port or ""),
        "TEST": {"NAME": name},
    }


DATABASES = {
    "default": _postgres("rj_dj_default"),
    "other": _postgres("rj_dj_other"),
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["RJ_DJ_SQLITE"],
        "TEST": {"NAME": os.environ["RJ_DJ_SQLITE"]},
    },
}
INSTALLED_APPS = [*INSTALLED_APPS, "tests.django.testapp"]  # noqa: F405
CELERY_BROKER_URL = os.environ["RELIABLE_JOB_TEST_REDIS_URL"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 2}
RELIABLE_JOB = {"database": "default", "poll_interval": 0.05, "backoff_cap": 1.0}
