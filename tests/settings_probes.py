"""For every setting: a value other than the default, and a probe that finds it in the object that
uses it (a relay, completion, the stager, the store, the worker bootstep). Shared by
``tests/unit/test_settings_sources.py`` and ``tests/django/test_django_settings.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reliable_job.relay import Relay, RelayGroup
from reliable_job.settings import Settings


class SessionProvider:
    """A ``session`` setting that records being asked (it has no session to give)."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> None:
        self.asked += 1


def non_default_values(tmp_path: Path) -> dict[str, Any]:
    from reliable_job.integrations.sqlalchemy import create_outbox_engine

    return {
        "enable_for_all_jobs": True,
        "preserve_dead_jobs": True,
        "database_url": f"sqlite:///{tmp_path / 'from-setting.sqlite3'}",
        "session": SessionProvider(),
        "engine": create_outbox_engine(f"sqlite:///{tmp_path / 'engine.sqlite3'}"),
        "table_name": "custom_outbox",
        "batch_size": 7,
        "poll_interval": 0.7,
        "listen_notify": False,
        "notify_interval": 0.25,
        "hot_poll": 0.05,
        "relay_in_worker": False,
        "backoff_cap": 3.0,
        "max_publish_attempts": 9,
        "completion_interval": 0.5,
        "redeliver_after": 120.0,
        "lost_check_after": 30.0,
        "metrics_port": 9808,
        "metrics_addr": "127.0.0.1",
        "heartbeat_interval": 2.5,
        "heartbeat_file": str(tmp_path / "relay.alive"),
    }


def as_text(value: Any) -> str:
    """The value as an environment variable (or a configuration string) spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def relays(runtime: Any) -> list[Relay]:
    """Every relay ``runtime.relay()`` builds (one per outbox database)."""
    built = runtime.relay()
    return list(built.relays) if isinstance(built, RelayGroup) else [built]


def _on_every_relay(runtime: Any, attribute: str, value: Any) -> None:
    seen = [getattr(relay, attribute) for relay in relays(runtime)]
    assert seen and all(each == value for each in seen), f"relay.{attribute}: {seen}, expected {value!r}"


def _relay_attribute(attribute: str) -> Callable[[Any, Any], None]:
    def probe(runtime: Any, value: Any) -> None:
        _on_every_relay(runtime, attribute, value)

    return probe


def _listen_notify(runtime: Any, value: Any) -> None:
    _on_every_relay(runtime, "listens", value)
    assert (runtime.database.stager.notify_throttle is not None) is value


def _notify_interval(runtime: Any, value: Any) -> None:
    assert runtime.database.stager.notify_throttle.interval == value


def _completion_interval(runtime: Any, value: Any) -> None:
    assert runtime.completion.interval == value


def _preserve_dead_jobs(runtime: Any, value: Any) -> None:
    assert runtime.completion.preserve_dead_jobs is value


def _enable_for_all_jobs(runtime: Any, value: Any) -> None:
    assert runtime.is_reliable("tests.a_task_without_an_option") is value


def _relay_in_worker(runtime: Any, value: Any) -> None:
    from reliable_job.integrations.celery.worker import RelayStep

    assert RelayStep(SimpleNamespace(app=runtime.app)).enabled is value


def _table_name(runtime: Any, value: Any) -> None:
    seen = [relay.store.table.name for relay in relays(runtime)]
    assert seen and all(each == value for each in seen), f"tables {seen}, expected {value!r}"


def _database_url(runtime: Any, value: Any) -> None:
    (relay,) = relays(runtime)
    assert str(relay.store.engine.url) == value
    assert str(runtime.database.engine.url) == value


def _engine(runtime: Any, value: Any) -> None:
    (relay,) = relays(runtime)
    assert relay.store.engine is value
    assert runtime.database.engine is value


def _session(runtime: Any, value: Any) -> None:
    runtime.database.stager.writer()  # staging outside bind(): the session provider is asked
    assert value.asked == 1


def _lost_check_after(runtime: Any, value: Any) -> None:
    _on_every_relay(runtime, "lost_check_after", value)
    seen = [relay.recovery.lost_check_after for relay in relays(runtime)]
    assert all(each == value for each in seen), f"relay.recovery.lost_check_after: {seen}"


def _metrics_step(runtime: Any, name: str, value: Any) -> None:
    """The worker's metrics bootstep is on and serves where the setting says (not started here)."""
    from reliable_job.integrations.celery.metrics_step import MetricsStep
    from reliable_job.integrations.prometheus import register

    step = MetricsStep(SimpleNamespace(app=runtime.app))
    register().disconnect()  # the step counts from now on in this process: not in the tests
    assert step.enabled is bool(step.runtime.settings.metrics_port)
    assert step.enabled or name != "metrics_port"
    assert getattr(step.runtime.settings, name) == value


def _heartbeat_interval(runtime: Any, value: Any) -> None:
    seen = [relay.heartbeat.interval for relay in relays(runtime)]
    assert seen and all(each == value for each in seen), f"relay.heartbeat.interval: {seen}"


def _heartbeat_file(runtime: Any, value: Any) -> None:
    seen = [relay.heartbeat.path for relay in relays(runtime)]
    assert seen and all(each == Path(value) for each in seen), f"relay.heartbeat.path: {seen}"


PROBES: dict[str, Callable[[Any, Any], None]] = {
    "enable_for_all_jobs": _enable_for_all_jobs,
    "preserve_dead_jobs": _preserve_dead_jobs,
    "database_url": _database_url,
    "session": _session,
    "engine": _engine,
    "table_name": _table_name,
    "batch_size": _relay_attribute("batch_size"),
    "poll_interval": _relay_attribute("poll_interval"),
    "listen_notify": _listen_notify,
    "notify_interval": _notify_interval,
    "hot_poll": _relay_attribute("hot_poll"),
    "relay_in_worker": _relay_in_worker,
    "backoff_cap": _relay_attribute("backoff_cap"),
    "max_publish_attempts": _relay_attribute("max_publish_attempts"),
    "completion_interval": _completion_interval,
    "redeliver_after": _relay_attribute("redeliver_after"),
    "lost_check_after": _lost_check_after,
    "metrics_port": lambda runtime, value: _metrics_step(runtime, "metrics_port", value),
    "metrics_addr": lambda runtime, value: _metrics_step(runtime, "metrics_addr", value),
    "heartbeat_interval": _heartbeat_interval,
    "heartbeat_file": _heartbeat_file,
}
"""One probe per setting; the guard below fails when a setting has none."""


def check_probes_cover_every_setting(tmp_path: Path) -> None:
    names = set(Settings.names())
    assert set(PROBES) == names, f"settings without a probe: {sorted(names - set(PROBES))}"
    values = non_default_values(tmp_path)
    assert set(values) == names, f"settings without a non-default value: {sorted(names - set(values))}"
    defaults = Settings()
    same = [n for n in names if values[n] == getattr(defaults, n)]
    assert not same, f"these 'non-default' values are the defaults: {same}"
    values["engine"].dispose()
