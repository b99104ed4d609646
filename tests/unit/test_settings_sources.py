"""Every setting, from every source, reaches the object that uses it.

Sources: keyword arguments of ``install``; ``RELIABLE_JOB_<NAME>`` variables; Celery's own
configuration, as objects through ``config_from_object(..., namespace="CELERY")``
(``CELERY_RELIABLE_JOB_<NAME>``, as a Django project writes it) and as strings through
``app.conf.update(reliable_job_<name>=...)``. Django's ``RELIABLE_JOB`` is in
``tests/django/test_django_settings.py``. No service needed: SQLite files and Celery's in-memory
broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from reliable_job import ConfigurationError, Settings
from reliable_job.integrations.celery import CeleryIntegration, install
from tests.settings_probes import PROBES, as_text, check_probes_cover_every_setting, non_default_values


def from_kwargs(app: Celery, name: str, value: Any, monkeypatch: pytest.MonkeyPatch) -> CeleryIntegration:
    return install(app, **{name: value})


def from_env(app: Celery, name: str, value: Any, monkeypatch: pytest.MonkeyPatch) -> CeleryIntegration:
    monkeypatch.setenv(f"RELIABLE_JOB_{name.upper()}", as_text(value))
    return install(app)


def from_celery_config(
    app: Celery, name: str, value: Any, monkeypatch: pytest.MonkeyPatch
) -> CeleryIntegration:
    config = type("Config", (), {f"CELERY_RELIABLE_JOB_{name.upper()}": value})
    app.config_from_object(config, namespace="CELERY")
    return install(app)


def from_celery_strings(
    app: Celery, name: str, value: Any, monkeypatch: pytest.MonkeyPatch
) -> CeleryIntegration:
    app.conf.update({f"reliable_job_{name}": as_text(value)})
    return install(app)


SOURCES: dict[str, Callable[..., CeleryIntegration]] = {
    "kwargs": from_kwargs,
    "env": from_env,
    "celery_config": from_celery_config,
    "celery_strings": from_celery_strings,
}

EXCLUDED: dict[tuple[str, str], str] = {
    ("env", "engine"): "a Python object: never read from the environment",
    ("env", "session"): "a Python object: never read from the environment",
    ("celery_strings", "engine"): "a Python object: as a string it is an error (tested below)",
    ("celery_strings", "session"): "a Python object: as a string it is an error (tested below)",
}
"""Combinations that are invalid by design, with the reason: not generated (never skipped)."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RELIABLE_JOB_* setting from outside; the outbox in a SQLite file of this test."""
    for name in Settings.names():
        monkeypatch.delenv(f"RELIABLE_JOB_{name.upper()}", raising=False)
    monkeypatch.setenv("RELIABLE_JOB_DATABASE_URL", f"sqlite:///{tmp_path / 'outbox.sqlite3'}")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("settings-sources", broker="memory://", set_as_current=False)
    yield app
    runtime = getattr(app, "reliable_job", None)
    if runtime is not None:
        runtime.database.engine.dispose()


def test_every_setting_has_a_probe_and_a_value(tmp_path):
    check_probes_cover_every_setting(tmp_path)
    names = set(Settings.names())
    assert {name for _, name in EXCLUDED} <= names and {source for source, _ in EXCLUDED} <= set(SOURCES)


@pytest.mark.parametrize(
    ("source", "name"),
    [(source, name) for source in SOURCES for name in Settings.names() if (source, name) not in EXCLUDED],
)
def test_a_setting_reaches_the_object_that_uses_it(source, name, app, tmp_path, monkeypatch):
    value = non_default_values(tmp_path)[name]
    runtime = SOURCES[source](app, name, value, monkeypatch)
    PROBES[name](runtime, value)


def test_precedence_code_then_celery_config_then_environment_then_defaults(app, monkeypatch):
    monkeypatch.setenv("RELIABLE_JOB_BATCH_SIZE", "11")
    monkeypatch.setenv("RELIABLE_JOB_POLL_INTERVAL", "0.9")
    monkeypatch.setenv("RELIABLE_JOB_BACKOFF_CAP", "4")
    config = type(
        "Config", (), {"CELERY_RELIABLE_JOB_BATCH_SIZE": 22, "CELERY_RELIABLE_JOB_POLL_INTERVAL": "0.8"}
    )
    app.config_from_object(config, namespace="CELERY")
    runtime = install(app, batch_size=33)
    assert runtime.settings.batch_size == 33, "code wins"
    assert runtime.settings.poll_interval == 0.8, "Celery configuration wins over the environment"
    assert runtime.settings.backoff_cap == 4.0, "the environment wins over the defaults"
    assert runtime.settings.hot_poll == Settings().hot_poll


def test_an_unknown_reliable_job_key_in_the_celery_configuration_is_an_error(app):
    app.config_from_object(type("Config", (), {"CELERY_RELIABLE_JOB_HOT_POL": 0.1}), namespace="CELERY")
    with pytest.raises(ConfigurationError, match="CELERY_RELIABLE_JOB_HOT_POL"):
        install(app)


def test_celery_configuration_strings_are_checked_like_environment_variables(app):
    app.conf.update(reliable_job_batch_size="many")
    with pytest.raises(ConfigurationError, match="reliable_job_batch_size='many' is not a valid int"):
        install(app)
    app.conf.update(reliable_job_batch_size=None, reliable_job_engine="sqlite://")
    with pytest.raises(ConfigurationError, match="reliable_job_engine cannot be given as text"):
        install(app)
    app.conf.update(reliable_job_engine=None, reliable_job_batch_size=0)
    with pytest.raises(ConfigurationError, match="batch_size must be at least 1"):
        install(app)


def test_install_takes_one_settings_object_or_keyword_settings(app, tmp_path):
    settings = Settings(batch_size=3, database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}")
    assert install(app, settings=settings).settings is settings
    app.reliable_job.database.engine.dispose()
    with pytest.raises(ConfigurationError, match="not both"):
        install(app, settings=settings, batch_size=4)
