"""Inside ``celery worker``: the relay bootstep and the completion signal handlers."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals

if TYPE_CHECKING:
    from reliable_job.integrations.celery.app import CeleryIntegration
    from reliable_job.relay import Relay, RelayGroup

logger = logging.getLogger(__name__)


class RelayStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs a relay thread in the worker's main process, after the pool has started."""

    requires = ("celery.worker.components:Pool",)
    label = "reliable-job relay"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        runtime: CeleryIntegration | None = getattr(worker.app, "reliable_job", None)
        self.enabled = bool(runtime is not None and runtime.settings.relay_in_worker)
        self.runtime = runtime
        self.relay: Relay | RelayGroup | None = None
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        assert self.runtime is not None
        self.relay = self.runtime.relay()
        self.thread = threading.Thread(target=self.relay.run, name="reliable-job-relay", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    shutdown = stop


def _runtime_for(task: Any) -> Any:
    if task is None:
        return None
    runtime = getattr(task.app, "reliable_job", None)
    if runtime is None or not runtime.is_reliable(task.name, task):
        return None
    return runtime


def _on_success(sender: Any = None, **_: Any) -> None:
    runtime = _runtime_for(sender)
    if runtime is not None:
        runtime.completion.succeeded(sender.request.id)


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    runtime = _runtime_for(sender)
    if runtime is not None and task_id:
        runtime.completion.failed(task_id, f"{type(exception).__name__}: {exception}")


def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    runtime = _runtime_for(sender)
    if runtime is not None and request is not None:
        reason = "expired" if _.get("expired") else "revoked"
        runtime.completion.failed(request.id, reason)


def _flush_completions(**_: Any) -> None:
    """Worker shutdown (``worker_shutdown``: main process, solo and threads pools;
    ``worker_process_shutdown``: a prefork child exiting): delete the rows still buffered."""
    for app in list(_apps):
        runtime = getattr(app, "reliable_job", None)
        if runtime is None:
            continue
        try:
            runtime.completion.close()
        except Exception:  # pragma: no cover - close() logs its own errors
            logger.exception("could not flush completed jobs at shutdown")


def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Mark a reliable job started in Redis (the loss check then leaves its row alone once its
    message was acknowledged early); ``lost.py``."""
    runtime = _reliable_runtime(sender)
    if runtime is not None and task_id:
        from reliable_job.integrations.celery.lost import mark_started, marker_ttls

        running, _ended = marker_ttls(runtime.settings.redeliver_after, runtime.settings.lost_check_after)
        mark_started(sender.app, task_id, running)


def _on_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    runtime = _reliable_runtime(sender)
    if runtime is not None and task_id:
        from reliable_job.integrations.celery.lost import mark_finished, marker_ttls

        _running, ended = marker_ttls(runtime.settings.redeliver_after, runtime.settings.lost_check_after)
        mark_finished(sender.app, task_id, ended)


def _reliable_runtime(task: Any) -> Any:
    """The runtime when ``task`` is reliable and the loss check is on, else ``None``."""
    if task is None:
        return None
    runtime = getattr(task.app, "reliable_job", None)
    if runtime is None or not runtime.settings.lost_check_after or not runtime.is_reliable(task.name, task):
        return None
    return runtime


_connected = False
_apps: weakref.WeakSet[Any] = weakref.WeakSet()


def connect_worker(app: Any) -> None:
    """Register the relay bootstep on ``app`` and the completion handlers (once per process)."""
    global _connected
    _apps.add(app)
    if RelayStep not in app.steps["worker"]:
        app.steps["worker"].add(RelayStep)
    if not _connected:
        signals.task_success.connect(_on_success, weak=False)
        signals.task_failure.connect(_on_failure, weak=False)
        signals.task_revoked.connect(_on_revoked, weak=False)
        signals.worker_process_shutdown.connect(_flush_completions, weak=False)
        signals.worker_shutdown.connect(_flush_completions, weak=False)
        signals.task_prerun.connect(_on_prerun, weak=False)
        signals.task_postrun.connect(_on_postrun, weak=False)
        _connected = True
