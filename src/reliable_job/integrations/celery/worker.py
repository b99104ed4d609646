"""Inside ``celery worker``: the relay bootstep and the completion signal handlers."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from celery import bootsteps, signals, states

from reliable_job.integrations.celery import handoff, visibility
from reliable_job.integrations.celery.stamp import is_stamped

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

    def info(self, worker: Any) -> dict[str, object]:
        """This relay's figures in ``celery inspect stats`` (and Flower's worker page), under
        ``reliable_job`` (:func:`~reliable_job.integrations.celery.visibility.relay_stats`)."""
        return {visibility.STATS_KEY: visibility.relay_stats(self.relay)}


def _runtime_for(task: Any, request: Any) -> Any:
    """The integration that completes this job, or ``None``: completion follows the stamp of the
    job's message (:mod:`~reliable_job.integrations.celery.stamp`), not the worker's idea of
    which tasks are reliable. A stamped message has a row in the outbox, whatever this worker's
    ``enable_for_all_jobs`` or the task's flag say; an unstamped one has none, and deleting by its
    id could only remove another job's row.

    ``request`` is the job's request; ``None`` when the signal comes from a place that no longer
    has it (the main process reporting a hard time limit or a ``Reject``): then, and only then,
    the worker's configuration decides, as it did before messages were stamped.
    """
    if task is None:
        return None
    runtime = getattr(task.app, "reliable_job", None)
    if runtime is None:
        return None
    if request is not None:
        return runtime if is_stamped(request) else None
    return runtime if runtime.is_reliable(task.name, task) else None


def _request_of(task: Any, task_id: str | None) -> Any:
    """The request of job ``task_id``: the task's current one while it runs (the signals sent from
    the pool's process), else the worker's record of it, else ``None``."""
    current = task.request if task is not None else None
    if current is not None and task_id is not None and current.id == task_id:
        return current
    from celery.worker import state

    return state.requests.get(task_id) if task_id else None


def _on_success(sender: Any = None, **_: Any) -> None:
    runtime = _runtime_for(sender, sender.request if sender is not None else None)
    if runtime is not None and not handoff.holds(sender.request):  # else _on_postrun hands off
        runtime.completion.succeeded(sender.request.id)


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    runtime = _runtime_for(sender, _request_of(sender, task_id))
    if runtime is not None and task_id and not handoff.holds(sender.request):
        runtime.completion.failed(task_id, _error(exception))


def _error(exception: BaseException | None) -> str:
    return f"{type(exception).__name__}: {exception}"


def _on_postrun(
    sender: Any = None, task_id: str | None = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    """The end of a task's trace, whatever its outcome: hand a staged job's row over to the
    continuations held for it (one transaction), and finish the rows of jobs that ended with
    ``Ignore`` or ``Reject`` (``task_success``/``task_failure`` do not fire for those).

    - success, or ``Ignore`` (``Task.replace`` raises it after publishing the replacement): the
      row is deleted and the continuations inserted;
    - failure, or ``Reject(requeue=False)``: the same, the row buried instead with
      ``preserve_dead_jobs``;
    - retry, or ``Reject(requeue=True)``: the row stays ``sent`` (the job runs again and publishes
      its continuations then); whatever was held is dropped.
    """
    if sender is None or task_id is None:
        return
    held = handoff.release(sender.request)
    runtime = _runtime_for(sender, sender.request)
    if runtime is None or getattr(sender.request, "is_eager", False):
        return
    jobs = held.jobs if held is not None else []
    rejected = state == states.REJECTED
    error: str | None = None
    if state == states.FAILURE:
        error = _error(retval if isinstance(retval, BaseException) else None)
    elif rejected and not getattr(retval, "requeue", False):
        error = f"Reject: {getattr(retval, 'reason', None) or retval!r}"
    elif state not in (states.SUCCESS, states.IGNORED):  # retry, Reject(requeue=True)
        if jobs:
            logger.info(
                "job %s ends in %s: its row stays, and the %d messages published on its behalf "
                "are published again when it runs again",
                task_id,
                state,
                len(jobs),
                extra={"reliable_job.job_id": task_id},
            )
        return
    if jobs:
        runtime.completion.hand_off(task_id, jobs, error=error, task_name=sender.name)
    elif state == states.IGNORED:
        runtime.completion.succeeded(task_id)
    elif rejected:
        runtime.completion.failed(task_id, error or "Reject", outcome="rejected")


def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    runtime = _runtime_for(sender, request)
    if runtime is not None and request is not None:
        reason = "expired" if _.get("expired") else "revoked"
        runtime.completion.failed(request.id, reason, outcome=reason)


def _flush_completions(**_: Any) -> None:
    """Worker shutdown (``worker_shutdown``: main process, solo and threads pools;
    ``worker_process_shutdown``: a prefork child exiting): delete the rows still buffered, and
    write the started markers still buffered (``markers.py``)."""
    from reliable_job.integrations.celery import markers

    markers.close()
    for app in list(_apps):
        runtime = getattr(app, "reliable_job", None)
        if runtime is None:
            continue
        try:
            runtime.completion.close()
        except Exception:  # pragma: no cover - close() logs its own errors
            logger.exception("could not flush completed jobs at shutdown")


def _mark_started(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Mark a staged job started in Redis (the loss check then leaves its row alone once its
    message was acknowledged early); ``lost.py``."""
    runtime = _checking_runtime(sender)
    if runtime is not None and task_id:
        from reliable_job.integrations.celery.lost import mark_started, marker_ttls

        running, _ended = marker_ttls(runtime.settings.redeliver_after, runtime.settings.lost_check_after)
        mark_started(sender.app, task_id, running)


def _mark_finished(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    """Shorten the started marker of a job that ended; not of one that retries (the retry set
    its marker until it is due: the retry's message is kombu's, the loss check cannot find it)."""
    if state == states.RETRY:
        return
    runtime = _checking_runtime(sender)
    if runtime is not None and task_id:
        from reliable_job.integrations.celery.lost import mark_finished, marker_ttls

        _running, ended = marker_ttls(runtime.settings.redeliver_after, runtime.settings.lost_check_after)
        mark_finished(sender.app, task_id, ended)


def _checking_runtime(task: Any) -> Any:
    """The runtime when ``task`` runs a staged job (the stamp, as completion) and the loss check
    is on, else ``None``."""
    runtime = _runtime_for(task, task.request if task is not None else None)
    if runtime is None or not runtime.settings.lost_check_after:
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
    from reliable_job.integrations.celery.metrics_step import MetricsStep  # enabled by metrics_port

    app.steps["worker"].add(MetricsStep)
    if not _connected:
        signals.task_success.connect(_on_success, weak=False)
        signals.task_failure.connect(_on_failure, weak=False)
        signals.task_revoked.connect(_on_revoked, weak=False)
        signals.task_postrun.connect(_on_postrun, weak=False)
        signals.worker_process_shutdown.connect(_flush_completions, weak=False)
        signals.worker_shutdown.connect(_flush_completions, weak=False)
        signals.task_prerun.connect(_mark_started, weak=False)
        signals.task_postrun.connect(_mark_finished, weak=False)
        _connected = True
