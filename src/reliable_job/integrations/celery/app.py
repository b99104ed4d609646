"""Celery: stage reliable tasks in the outbox instead of publishing them.

``install(app)`` wraps ``app.send_task`` (which ``Task.apply_async``, ``delay`` and signatures all
go through). For a reliable task it runs Celery's own message preparation with a producer that
captures instead of sending, then writes the finished message to the outbox in the caller's
transaction. The caller gets the usual ``AsyncResult`` with the real task id.

:class:`CeleryIntegration` is what ``install`` leaves on ``app.reliable_job``: one
:class:`~reliable_job.settings.Settings` (read by
:func:`~reliable_job.integrations.celery.config.load_settings`) and one
:class:`~reliable_job.ports.OutboxDatabase`, from which staging, completion and the relays are
built.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kombu.exceptions import EncodeError
from kombu.utils.uuid import uuid

from reliable_job.completion import Completion
from reliable_job.errors import ConfigurationError, NotSerializableError, StagingError
from reliable_job.integrations.celery import canvas, handoff
from reliable_job.integrations.celery.capture import CapturingProducer
from reliable_job.integrations.celery.config import load_settings
from reliable_job.integrations.celery.retry import postpone_retry, retry_due
from reliable_job.integrations.celery.stamp import is_stamped, stamp
from reliable_job.ports import OutboxDatabase, OutboxStore, StagedJob
from reliable_job.relay import Relay, RelayGroup
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)

SESSION_OPTION = "reliable_job_session"
"""``apply_async`` option: stage this one call in the given session's or connection's transaction."""


class CeleryIntegration:
    """reliable-job installed on one Celery app: staging, completion, relays.

    ``database`` is the outbox (by default a SQLAlchemy database built from ``settings``; the
    Django integration passes its own, one store per database alias).
    """

    def __init__(self, app: Any, settings: Settings, database: OutboxDatabase | None = None) -> None:
        self.app = app
        self.settings = settings
        if database is None:
            from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase

            # cast: until SQLAlchemyDatabase.claim is typed as the port's (sqla-seam)
            database = SQLAlchemyDatabase(settings)
        self.database: OutboxDatabase = database
        self.completion = Completion(database, settings)
        self._capture_connection: Any = None
        self._producers: list[CapturingProducer] = []
        """Capturing producers not in use: made once, reused (a nested capture, e.g. from a
        ``before_task_publish`` handler, takes another)."""
        self._send_task: Callable[..., Any] | None = None

    # -- which tasks ---------------------------------------------------------------------------

    def is_reliable(self, name: str, task: Any = None) -> bool:
        """A task's own ``reliable_job`` option wins; else ``enable_for_all_jobs`` decides.

        Celery's built-in tasks (``celery.*``) are reliable only when they say so.
        """
        if task is None:
            task = self.app._tasks.get(name)
        flag = getattr(task, "reliable_job", None) if task is not None else None
        if flag is not None:
            return bool(flag)
        return self.settings.enable_for_all_jobs and not name.startswith("celery.")

    def is_staged(self, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> bool:
        """Whether ``send_task`` stages this message (and stamps it): its task is reliable, or
        it carries a reliable task (a chain's next steps, ``link``/``link_error``, a chord body,
        the task of ``celery.map``/``starmap``/``chunks``/``chord_unlock``), or it belongs to a
        group or chord that does (:mod:`~reliable_job.integrations.celery.canvas`)."""
        if self.is_reliable(name, options.get("task_type")):
            return True
        return canvas.reliable_scope(self.app) or canvas.carries_reliable(
            self.is_reliable, name, args, kwargs, options
        )

    # -- staging -------------------------------------------------------------------------------

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        assert self._send_task is not None
        target = options.pop(SESSION_OPTION, None)
        if target is None:
            # In a worker: a message published on behalf of a running staged job (handoff.py).
            held = handoff.continuation_of(self, options.get("task_id"), options)
            if held is not None:
                return handoff.capture(self, held, name, args, kwargs, options)
        parent = self.app.current_worker_task
        retried = parent is not None and options.get("task_id") == parent.request.id
        if retried and is_stamped(parent.request):
            # Celery re-publishing a staged job (a retry): not staged again, whatever this worker
            # thinks of the task (completion follows the stamp, so does the retry's bookkeeping).
            return self._publish_retry(name, args, kwargs, options)
        if not self.is_staged(name, args, kwargs, options):
            return self._send_task(name, args, kwargs, **options)
        if retried:
            return self._publish_retry(name, args, kwargs, options)
        result, job = self.capture(name, args, kwargs, options)
        self.database.stager.stage([job], target)
        return result

    def capture(self, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> tuple[Any, StagedJob]:
        """Run Celery's whole message preparation with a producer that captures instead of
        sending, the message stamped as staged: Celery's ``AsyncResult`` and the job to stage (or
        to hold for a hand-off, ``handoff.py``). Arguments the serializer refuses raise
        :class:`~reliable_job.errors.NotSerializableError` here, at the call."""
        assert self._send_task is not None
        task_id = options.get("task_id") or uuid()
        options["task_id"] = task_id
        stamp(options)
        options.pop("connection", None)
        options.pop("publisher", None)
        try:
            producer = self._producers.pop()
        except IndexError:
            producer = CapturingProducer(self._capture_conn(), auto_declare=False)
        options["producer"] = producer
        _skip_result_subscription(self.app.backend)
        try:
            result = self._send_task(name, args, kwargs, **options)
        except EncodeError as exc:
            raise NotSerializableError(
                f"cannot enqueue {name}[{task_id}]: its arguments cannot be serialized: {exc}"
            ) from exc
        finally:
            captured, producer.captured = producer.captured, None
            self._producers.append(producer)
        if captured is None:
            raise StagingError(f"Celery published no message for {name}[{task_id}]")
        return result, StagedJob(task_id, name, captured.queue, captured.to_json(), captured.eta)

    def _publish_retry(self, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> Any:
        """A retry of the running job (same id), published directly: its row's due time moves to
        the retry's first (integrations/celery/retry.py), and its started marker lasts until the
        retry is due plus the usual running time, so the loss check does not take the retry's
        message (published by kombu, not by the relay) for a lost one."""
        assert self._send_task is not None
        task_id = str(options["task_id"])
        postpone_retry(self.database, task_id, options)
        parent = self.app.current_worker_task
        if parent is not None and is_stamped(parent.request):
            stamp(options)  # Celery republishes the request's headers; this only makes sure
            if self.settings.lost_check_after:
                from reliable_job.integrations.celery.lost import mark_started, marker_ttls

                running, _ended = marker_ttls(self.settings.redeliver_after, self.settings.lost_check_after)
                wait = (retry_due(options) - datetime.now(timezone.utc)).total_seconds()
                mark_started(self.app, task_id, max(0.0, wait) + running)
        return self._send_task(name, args, kwargs, **options)

    def _capture_conn(self) -> Any:
        if self._capture_connection is None:
            # Never connected: it only lets Celery and kombu prepare the message.
            self._capture_connection = self.app.connection_for_write()
        return self._capture_connection

    # -- relay ---------------------------------------------------------------------------------

    def relay(self, store: OutboxStore | None = None) -> Relay | RelayGroup:
        """The relays of this app's outbox: one per store of ``database.relay_stores()`` (or one
        of ``store``), each listening through its store's ``listener``, publishing through the
        app's broker; several run as one :class:`~reliable_job.relay.RelayGroup`."""
        from reliable_job.integrations.celery.broker import KombuBroker

        stores = [store] if store is not None else list(self.database.relay_stores())
        relays = [Relay(each, KombuBroker(self.app), self.settings, listen=each.listener) for each in stores]
        return relays[0] if len(relays) == 1 else RelayGroup(relays)


def _skip_result_subscription(backend: Any) -> None:
    """Staging must need neither the broker nor the result backend.

    Celery's Redis result backend subscribes to a task's result at enqueue time (``on_task_call``)
    and retries for about 20 s when Redis is down. For a staged job it does nothing: the job is not
    on the broker yet, and ``AsyncResult.get()`` subscribes, and reads the stored result, itself.
    """
    if getattr(backend, "_reliable_job_skips_staged", False):
        return
    original = backend.on_task_call

    def on_task_call(producer: Any, task_id: str) -> Any:
        if isinstance(producer, CapturingProducer):
            return None
        return original(producer, task_id)

    backend.on_task_call = on_task_call
    backend._reliable_job_skips_staged = True


def install(
    app: Any,
    *,
    database: OutboxDatabase | None = None,
    settings: Settings | None = None,
    **values: Any,
) -> CeleryIntegration:
    """Install reliable-job on a Celery app.

    Settings, by precedence: keyword arguments, the app's configuration
    (``app.conf.reliable_job_<name>``, see :mod:`reliable_job.integrations.celery.config`),
    ``RELIABLE_JOB_<NAME>`` variables, the defaults; or one complete ``settings`` object (then no
    keyword settings). Stages reliable tasks, deletes their rows when they complete (in
    ``celery worker``), and starts a relay thread in every worker unless
    ``relay_in_worker=False``. ``database`` lets another database layer (the Django integration)
    plug in.
    """
    from reliable_job.integrations.celery.worker import connect_worker

    if settings is None:
        settings = load_settings(app, values)
    elif values:
        raise ConfigurationError("install(): pass settings=... or keyword settings, not both")
    existing = getattr(app, "reliable_job", None)
    original = existing._send_task if existing is not None else app.send_task
    runtime = CeleryIntegration(app, settings, database)
    runtime._send_task = original

    @functools.wraps(original)
    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        return runtime.send_task(name, args, kwargs, **options)

    app.send_task = send_task
    app.reliable_job = runtime
    canvas.wrap_canvas()
    connect_worker(app)
    return runtime


def runtime_of(app: Any) -> CeleryIntegration:
    runtime = getattr(app, "reliable_job", None)
    if not isinstance(runtime, CeleryIntegration):
        raise StagingError(
            "reliable-job is not installed on this Celery app: call "
            "reliable_job.integrations.celery.install(app)"
        )
    return runtime
