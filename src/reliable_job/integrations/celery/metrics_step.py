"""Inside ``celery worker``: Prometheus metrics when the ``metrics_port`` setting is given."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from reliable_job.errors import ConfigurationError

if TYPE_CHECKING:
    from reliable_job.integrations.celery.app import CeleryIntegration

logger = logging.getLogger(__name__)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Counts in every worker process and serves ``/metrics`` from the main one.

    The counters are connected to :mod:`reliable_job.signals` when the worker is built, before
    the prefork pool forks, so the children (where jobs complete) count too; their counts reach
    the main process's server only in ``prometheus_client``'s multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``). The server starts with the worker, in its main process (where
    the in-worker relay runs), and serves the outbox gauges too.
    """

    label = "reliable-job metrics"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        runtime: CeleryIntegration | None = getattr(worker.app, "reliable_job", None)
        self.runtime = runtime
        self.enabled = bool(runtime is not None and runtime.settings.metrics_port)
        self.server: Any = None
        if self.enabled:
            _prometheus().register()

    def start(self, worker: Any) -> None:
        """Serve ``/metrics``. A port already in use (two workers on one host given the same
        ``metrics_port``) is logged, not raised: the worker still runs its jobs, its relay and
        its completions, which matter more than its metrics."""
        assert self.runtime is not None
        settings = self.runtime.settings
        try:
            self.server = _prometheus().serve(
                settings.metrics_port, settings.metrics_addr, database=self.runtime.database
            )
        except OSError as exc:
            logger.error(
                "cannot serve metrics on %s:%d, the worker runs without them: %s",
                settings.metrics_addr,
                settings.metrics_port,
                exc,
            )

    def stop(self, worker: Any) -> None:
        server = self.server[0] if isinstance(self.server, tuple) else None
        self.server = None
        if server is not None:
            server.shutdown()
            server.server_close()

    shutdown = stop


def _prometheus() -> Any:
    try:
        from reliable_job.integrations import prometheus
    except ImportError as exc:
        raise ConfigurationError(
            f"the metrics_port setting needs prometheus_client: pip install 'reliable-job[metrics]' ({exc})"
        ) from exc
    return prometheus
