"""The Django settings of the enqueue figure's Django path (``enqueue_django_ratio``): one model
(``bench.djangoshop``), the reliable-job app, the bench's PostgreSQL as ``default``.

Configured in-process by :mod:`bench.django_path` (``DJANGO_SETTINGS_MODULE`` is set only while
``django.setup()`` runs, so the bench's subprocesses never see Django). The outbox table is the
bench's (``RELIABLE_JOB_TABLE_NAME``, set by the harness): the Django model renders the same table.
"""

import os
from urllib.parse import unquote, urlsplit

_pg = urlsplit(os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"])

SECRET_KEY = "bench-only-not-secret"
DEBUG = False  # no query log: Django keeps every query when DEBUG is on
INSTALLED_APPS = ["reliable_job.integrations.django", "bench.djangoshop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _pg.path.lstrip("/"),
        "USER": unquote(_pg.username or ""),
        "PASSWORD": unquote(_pg.password or ""),
        "HOST": _pg.hostname or "",
        "PORT": str(_pg.port or ""),
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
RELIABLE_JOB = {"database": "default"}
