"""Django system checks (``reliable_job.integrations.django.checks``): each check fires, a bad
``RELIABLE_JOB`` no longer crashes ``manage.py`` (the checks report it; ``migrate`` runs with
``--skip-checks``), and staging or starting a worker with it still refuses, saying why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder
from django.test import override_settings

from reliable_job import ConfigurationError, Settings
from reliable_job.integrations.django import checks
from tests.django.conftest import EXAMPLE, env

OVERRIDE = "tests.django.settings_override"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.names():
        monkeypatch.delenv(f"RELIABLE_JOB_{name.upper()}", raising=False)


def ids(messages) -> list[str]:
    return [message.id for message in messages]


def settings_check(**reliable_job: object) -> list[str]:
    with override_settings(RELIABLE_JOB=reliable_job):
        return ids(checks.check_settings())


def test_the_test_settings_pass_every_check():
    assert ids(checks.check_settings()) == []
    assert ids(checks.check_eager()) == []


def test_e001_reliable_job_not_a_dict():
    with override_settings(RELIABLE_JOB=["batch_size", 5]):
        assert ids(checks.check_settings()) == ["reliable_job.E001"]


def test_e002_an_unknown_key_each():
    assert settings_check(batch_sise=5, pol_interval=1) == ["reliable_job.E002"] * 2


def test_e003_where_the_outbox_is_cannot_be_set():
    assert settings_check(database_url="sqlite://") == ["reliable_job.E003"]


@pytest.mark.parametrize(
    "values",
    [
        {"batch_size": 0},
        {"poll_interval": -1},
        {"max_publish_attempts": "five"},
        {"table_name": "bad-name"},
        {"batch_size": 0, "redeliver_after": -5},
    ],
)
def test_e004_one_error_per_invalid_value(values):
    assert settings_check(**values) == ["reliable_job.E004"] * len(values)


def test_e005_an_alias_not_in_databases():
    assert settings_check(database="nope", databases=["default", "gone"]) == ["reliable_job.E005"] * 2


def test_e006_the_environment_or_the_celery_configuration_invalid(monkeypatch):
    monkeypatch.setenv("RELIABLE_JOB_BATCH_SIZE", "many")
    assert settings_check(database="default") == ["reliable_job.E006"]


def test_e007_a_table_name_too_long_for_the_databases_identifiers():
    name = "t" * 56
    with override_settings(RELIABLE_JOB={"table_name": name}):
        [message] = checks.check_settings()
    assert message.id == "reliable_job.E007"
    assert "default: 63" in message.msg, "PostgreSQL's identifier limit is named"


def test_e008_an_outbox_on_an_unsupported_database(monkeypatch):
    monkeypatch.setattr(connections["sqlite"], "vendor", "mysql")
    assert settings_check(database="sqlite") == ["reliable_job.E008"]


def test_w001_task_always_eager(monkeypatch):
    from proj.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    messages = checks.check_eager()
    assert ids(messages) == ["reliable_job.W001"]
    assert "'proj'" in messages[0].msg


@pytest.mark.django_db(databases=["default", "sqlite"])
def test_w002_the_outbox_table_missing_only_with_database_checks():
    with override_settings(RELIABLE_JOB={"database": "sqlite", "table_name": "rj_nowhere"}):
        assert ids(checks.check_outbox_tables(databases=None)) == [], "plain check: no database access"
        messages = checks.check_outbox_tables(databases=["sqlite"])
    assert ids(messages) == ["reliable_job.W002"]
    assert "'rj_nowhere'" in messages[0].msg and "'sqlite'" in messages[0].msg
    assert ids(checks.check_outbox_tables(databases=["default", "sqlite"])) == []


@pytest.mark.django_db(databases=["default", "sqlite"])
def test_w003_a_migration_unapplied():
    recorder = MigrationRecorder(connections["sqlite"])
    recorder.record_unapplied("reliable_job", "0001_initial")
    try:
        messages = checks.check_outbox_tables(databases=["sqlite"])
    finally:
        recorder.record_applied("reliable_job", "0001_initial")
    assert ids(messages) == ["reliable_job.W003"]
    assert "0001_initial" in messages[0].msg


# -- manage.py with a bad RELIABLE_JOB (subprocesses) --------------------------------------------


def run(argv: list[str], bad: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=EXAMPLE,
        env=env(DJANGO_SETTINGS_MODULE=OVERRIDE, RJ_DJ_RELIABLE_JOB=json.dumps(bad)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def manage(*args: str, bad: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "manage.py", *args], bad)


@pytest.mark.django_db(databases=["default", "sqlite"])
def test_a_bad_setting_is_reported_by_check_and_no_longer_breaks_migrate():
    bad = {"batch_size": 0, "hot_pol": 1}
    checked = manage("check", bad=bad)
    assert checked.returncode == 1
    assert "Traceback" not in checked.stderr, checked.stderr
    assert "reliable_job.E004" in checked.stderr and "reliable_job.E002" in checked.stderr

    migrate = manage("migrate", "--database", "sqlite", bad=bad)
    assert migrate.returncode == 1, "Django stops a command on check errors, with the list"
    assert "Traceback" not in migrate.stderr and "reliable_job.E004" in migrate.stderr, migrate.stderr
    migrated = manage("migrate", "--database", "sqlite", "--skip-checks", bad=bad)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "No migrations to apply" in migrated.stdout


@pytest.mark.parametrize(
    ("table_name", "check_id"), [("t" * 80, "reliable_job.E007"), ("bad-name", "reliable_job.E004")]
)
def test_a_bad_table_name_is_reported_by_check_not_a_crash_at_start_up(table_name, check_id):
    """Both models (the outbox and its relays' heartbeat table) start Django with a bad table
    name, so that ``manage.py check`` reports it instead of a traceback from the models' import."""
    checked = manage("check", bad={"table_name": table_name})
    assert checked.returncode == 1
    assert "Traceback" not in checked.stderr, checked.stderr
    assert check_id in checked.stderr, checked.stderr


@pytest.mark.django_db(databases=["default"])
def test_with_a_bad_setting_staging_raises_and_the_worker_refuses_to_start():
    bad = {"batch_size": 0}
    staged = manage(
        "shell", "-c", "from tests.django.testapp.tasks import record; record.delay('x')", bad=bad
    )
    assert staged.returncode != 0
    assert "ConfigurationError: cannot enqueue tests.django.testapp.tasks.record" in staged.stderr
    assert "batch_size must be at least 1" in staged.stderr

    worker = run(
        [sys.executable, "-m", "celery", "-A", "proj", "worker", "--pool=solo", "--without-gossip"], bad
    )
    assert worker.returncode != 0
    assert "reliable-job configuration is invalid" in worker.stdout + worker.stderr


def test_install_still_raises_on_a_bad_setting():
    from celery import Celery

    from reliable_job.integrations.django.runtime import install

    app = Celery("checks", set_as_current=False)
    with override_settings(RELIABLE_JOB={"batch_size": 0}):
        with pytest.raises(ConfigurationError, match="batch_size must be at least 1"):
            install(app)
