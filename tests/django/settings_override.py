"""The Django test settings with ``RELIABLE_JOB`` entries taken from ``RJ_DJ_RELIABLE_JOB`` (JSON):
``manage.py`` subprocesses started with settings a test wants wrong
(tests/django/test_django_checks.py)."""

import json
import os

from tests.django.settings import *  # noqa: F403

RELIABLE_JOB = {**RELIABLE_JOB, **json.loads(os.environ.get("RJ_DJ_RELIABLE_JOB", "{}"))}  # noqa: F405
