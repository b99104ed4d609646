"""Every setting from Django's ``RELIABLE_JOB`` (and from ``CELERY_RELIABLE_JOB_<NAME>`` through
Celery's Django layout) reaches the object that uses it, on every alias's relay."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from django.test import override_settings

from reliable_job import ConfigurationError, Settings
from tests.settings_probes import PROBES, check_probes_cover_every_setting, non_default_values

EXCLUDED: dict[str, str] = {
    "database_url": "Django: the outbox is in the DATABASES alias RELIABLE_JOB['database'] names",
    "engine": "Django: the outbox is in the DATABASES alias RELIABLE_JOB['database'] names",
    "session": "Django: staging joins Django's atomic() on the alias, no session provider",
}
"""Settings that cannot be set with Django, by design (``conf.read`` refuses them: tested below)."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.names():
        monkeypatch.delenv(f"RELIABLE_JOB_{name.upper()}", raising=False)


@pytest.fixture
def app() -> Iterator[Celery]:
    """A Celery app of the Django layout (configured from Django's settings, namespace CELERY)."""
    app = Celery("django-settings", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    yield app
    runtime = getattr(app, "reliable_job", None)
    if runtime is not None:
        runtime.database.dispose()


def install(app: Celery):
    from reliable_job.integrations.django.runtime import install

    return install(app)


def test_every_setting_has_a_probe(tmp_path):
    check_probes_cover_every_setting(tmp_path)
    assert set(EXCLUDED) == set(Settings.database_location_names())


@pytest.mark.parametrize("name", [name for name in Settings.names() if name not in EXCLUDED])
def test_a_setting_in_reliable_job_reaches_the_object_that_uses_it(name, app, tmp_path):
    value = non_default_values(tmp_path)[name]
    with override_settings(RELIABLE_JOB={"database": "default", name: value}):
        runtime = install(app)
    PROBES[name](runtime, value)


@pytest.mark.parametrize("name", [name for name in Settings.names() if name not in EXCLUDED])
def test_a_setting_in_the_celery_configuration_reaches_the_object_that_uses_it(name, app, tmp_path):
    """``CELERY_RELIABLE_JOB_<NAME>`` in Django's settings, read by Celery's Django layout."""
    value = non_default_values(tmp_path)[name]
    celery_setting = {f"CELERY_RELIABLE_JOB_{name.upper()}": value}
    with override_settings(RELIABLE_JOB={"database": "default"}, **celery_setting):
        runtime = install(app)
    PROBES[name](runtime, value)


def test_precedence_reliable_job_then_celery_configuration_then_environment(app, monkeypatch):
    monkeypatch.setenv("RELIABLE_JOB_BATCH_SIZE", "11")
    monkeypatch.setenv("RELIABLE_JOB_HOT_POLL", "0.09")
    monkeypatch.setenv("RELIABLE_JOB_BACKOFF_CAP", "4")
    with override_settings(
        RELIABLE_JOB={"batch_size": 33},
        CELERY_RELIABLE_JOB_BATCH_SIZE=22,
        CELERY_RELIABLE_JOB_HOT_POLL="0.08",
    ):
        runtime = install(app)
    assert runtime.settings.batch_size == 33, "RELIABLE_JOB wins"
    assert runtime.settings.hot_poll == 0.08, "the Celery configuration wins over the environment"
    assert runtime.settings.backoff_cap == 4.0, "the environment wins over the defaults"


def test_where_the_outbox_is_cannot_be_set_in_the_celery_configuration(app):
    with override_settings(CELERY_RELIABLE_JOB_DATABASE_URL="sqlite://"):
        with pytest.raises(ConfigurationError, match="CELERY_RELIABLE_JOB_DATABASE_URL cannot be set"):
            install(app)


def test_an_unknown_key_in_the_celery_configuration_is_an_error(app):
    with override_settings(CELERY_RELIABLE_JOB_HOT_POL=0.1):
        with pytest.raises(ConfigurationError, match="CELERY_RELIABLE_JOB_HOT_POL"):
            install(app)
