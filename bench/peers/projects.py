"""The three Django projects of the side-by-side bench, written as a user would write them.

Each has the same model (``shop.Order``), the same no-op task (``shop.tasks.noop``), Celery's
standard Django layout and durable PostgreSQL; they differ only in the outbox:

* ``reliable_job``: ``reliable_job.integrations.django`` in ``INSTALLED_APPS``, ``RELIABLE_JOB``
  settings, the task marked ``reliable_job=True`` (as in ``examples/django_project``);
* ``peer``: django-celery-outbox as its README says (``django_celery_outbox`` in
  ``INSTALLED_APPS``, ``CELERY_OUTBOX_APP``, the app an ``OutboxCelery``), its StatsD metrics off
  (no agent runs here; reliable-job emits none either);
* ``plain``: Celery alone, ``.delay()`` publishing straight to Redis.

Each project has a database of its own on the same server, and a Redis database of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

SYSTEMS = ("reliable_job", "peer", "plain")
REDIS_DBS = {"reliable_job": 1, "peer": 2, "plain": 3}
QUEUE = "celery"
"""Celery's default queue: the Redis list every project's task lands in."""
OUTBOX_TABLES = {"reliable_job": "reliable_job_outbox", "peer": "celery_outbox"}
RELAY_COMMANDS = {
    "reliable_job": ["reliable_job", "relay"],
    "peer": ["celery_outbox_relay"],
}
"""Each outbox's own relay, as its documentation runs it (``manage.py <command>``), defaults."""


@dataclass(frozen=True)
class Project:
    system: str
    path: Path
    database: str
    redis_url: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a process of this project runs with."""
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "benchproj.settings",
                "PYTHONPATH": os.pathsep.join([str(self.path), root]),
                "PEERS_SYSTEM": self.system,
                "PEERS_DATABASE": self.database,
                "PEERS_BROKER_URL": self.redis_url,
            }
        )
        env.update(extra)
        return env

    def manage(self, *args: str) -> list[str]:
        return [sys.executable, str(self.path / "manage.py"), *args]


SETTINGS = '''"""Settings of the {system} project (bench/peers/projects.py)."""

import os
from urllib.parse import urlsplit

_pg = urlsplit(os.environ["RELIABLE_JOB_TEST_POSTGRES_URL"])
SECRET_KEY = "bench-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["127.0.0.1"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", {apps}"shop"]
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["PEERS_DATABASE"],
        "USER": _pg.username or "postgres",
        "HOST": _pg.hostname,
        "PORT": str(_pg.port),
        "CONN_MAX_AGE": None,
        "OPTIONS": {{"application_name": os.environ.get("PEERS_APPLICATION_NAME", "peers")}},
    }}
}}
CELERY_BROKER_URL = os.environ["PEERS_BROKER_URL"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
LOGGING = {{
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {{"stderr": {{"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}}}},
    "root": {{"handlers": ["stderr"], "level": "WARNING"}},
}}
{extra}'''

EXTRA = {
    "reliable_job": 'RELIABLE_JOB = {"database": "default"}\n',
    "peer": 'CELERY_OUTBOX_APP = "benchproj.celery.app"\nMONITORING_METRICS_ENABLED = False\n',
    "plain": "",
}
APPS = {
    "reliable_job": '"reliable_job.integrations.django", ',
    "peer": '"django_celery_outbox", ',
    "plain": "",
}
CELERY = """import os

from celery import Celery
{import_line}
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchproj.settings")

app = {cls}("benchproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
"""
TASKS = '''from celery import shared_task


@shared_task{options}
def noop(*args):
    """Does nothing: the bench measures getting it to the broker."""
'''
MODELS = """from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=50)
    created_at = models.DateTimeField(auto_now_add=True)
"""
MIGRATION = """from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("item", models.CharField(max_length=50)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
"""
MANAGE = """import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchproj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write(system: str, path: Path, redis_server_url: str) -> Project:
    """Write the ``system`` project in ``path``."""
    peer = system == "peer"
    _write(path / "manage.py", MANAGE)
    _write(
        path / "benchproj" / "__init__.py",
        "from .celery import app as celery_app\n\n__all__ = ['celery_app']\n",
    )
    _write(
        path / "benchproj" / "settings.py",
        SETTINGS.format(system=system, apps=APPS[system], extra=EXTRA[system]),
    )
    _write(
        path / "benchproj" / "celery.py",
        CELERY.format(
            import_line="from django_celery_outbox import OutboxCelery\n" if peer else "",
            cls="OutboxCelery" if peer else "Celery",
        ),
    )
    _write(path / "shop" / "__init__.py", "")
    _write(path / "shop" / "models.py", MODELS)
    _write(
        path / "shop" / "tasks.py",
        TASKS.format(options="(reliable_job=True)" if system == "reliable_job" else ""),
    )
    _write(path / "shop" / "migrations" / "__init__.py", "")
    _write(path / "shop" / "migrations" / "0001_initial.py", MIGRATION)
    return Project(system, path, f"peers_{system}", f"{redis_server_url}/{REDIS_DBS[system]}")


def create_all(base: Path, postgres_url: str, redis_server_url: str, log_dir: Path) -> dict[str, Project]:
    """Write the three projects under ``base``, create their databases, run ``migrate``."""
    conninfo = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    projects = {s: write(s, base / s, redis_server_url) for s in SYSTEMS}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for project in projects.values():
            conn.execute(f"DROP DATABASE IF EXISTS {project.database}")
            conn.execute(f"CREATE DATABASE {project.database}")
    for project in projects.values():
        with open(log_dir / f"migrate-{project.system}.log", "wb") as log:
            subprocess.run(
                project.manage("migrate", "--no-input"),
                env=project.env(),
                cwd=project.path,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
    return projects


def server_url(redis_url: str) -> str:
    """``redis://host:port`` of a ``redis://host:port/db`` URL."""
    parts = urlsplit(redis_url)
    return f"{parts.scheme}://{parts.netloc}"
