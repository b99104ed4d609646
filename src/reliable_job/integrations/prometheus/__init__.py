"""Prometheus metrics for reliable-job (the ``metrics`` extra: ``prometheus_client``).

- :func:`register` puts the counters on a registry (the default one unless given) and connects
  them to :mod:`reliable_job.signals`; with ``database=``, the outbox gauges too (read at scrape
  time). For an application that serves its own metrics (django-prometheus...).
- :func:`serve` does that and starts ``prometheus_client``'s HTTP server: what
  ``reliable-job relay --metrics-port`` and a worker with the ``metrics_port`` setting run. With
  ``PROMETHEUS_MULTIPROC_DIR`` set (Celery's prefork pool: jobs complete in child processes), the
  server aggregates every process's counters (``prometheus_client``'s multiprocess mode).

The names are in :mod:`reliable_job.integrations.prometheus.metrics` and
:mod:`~reliable_job.integrations.prometheus.collector`; docs/operating/metrics.md.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from reliable_job.integrations.prometheus.collector import HasStatus, OutboxCollector
from reliable_job.integrations.prometheus.metrics import Metrics

__all__ = ["Metrics", "OutboxCollector", "multiprocess_dir", "register", "serve"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_collected: weakref.WeakKeyDictionary[CollectorRegistry, set[int]] = weakref.WeakKeyDictionary()


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when set: ``prometheus_client``'s multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def register(registry: CollectorRegistry | None = None, *, database: HasStatus | None = None) -> Metrics:
    """reliable-job's counters on ``registry`` (default: ``prometheus_client.REGISTRY``),
    counting from now on; with ``database`` (an outbox database or store: anything with
    ``status()``) also the outbox gauges, read at each scrape. Calling it again with the same
    registry returns the same :class:`Metrics` (and adds a database's gauges once).

    In multiprocess mode pass the registry you serve (the one holding
    ``MultiProcessCollector``) only for ``database``; the counters belong on the default registry
    of every process, where ``prometheus_client`` writes them to the shared directory.
    """
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _metrics.get(registry)
        if metrics is None:
            metrics = _metrics[registry] = Metrics(registry)
        metrics.connect()
        if database is not None:
            _add_collector(registry, database)
    return metrics


def _add_collector(registry: CollectorRegistry, database: HasStatus) -> None:
    """The outbox gauges of ``database`` on ``registry``, once (the lock held)."""
    seen = _collected.setdefault(registry, set())
    if id(database) not in seen:
        registry.register(OutboxCollector(database))
        seen.add(id(database))


def serve(port: int, addr: str = "0.0.0.0", *, database: HasStatus | None = None) -> Any:  # noqa: S104
    """Count (:func:`register` on the default registry) and serve ``/metrics`` on ``addr:port``
    from a daemon thread of this process; the outbox gauges too when ``database`` is given.
    Returns what ``start_http_server`` returns (``(server, thread)`` in recent releases).

    With ``PROMETHEUS_MULTIPROC_DIR`` set, the server reads every process's counters from that
    directory (empty it before the processes start: stale files are counted too).
    """
    register()
    served = REGISTRY
    if multiprocess_dir():
        from prometheus_client import multiprocess

        served = CollectorRegistry()
        multiprocess.MultiProcessCollector(served)  # type: ignore[no-untyped-call]
    if database is not None:
        with _lock:
            _add_collector(served, database)
    result = start_http_server(port, addr, registry=served)
    logger.info(
        "metrics on http://%s:%d/metrics%s",
        addr,
        port,
        " (multiprocess mode)" if multiprocess_dir() else "",
    )
    return result
