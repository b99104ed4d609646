"""Gauges read from the outbox when Prometheus scrapes: rows by state, oldest pending and sent."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from reliable_job.ports import OutboxStatus

logger = logging.getLogger(__name__)


class HasStatus(Protocol):
    """What the collector reads: an :class:`~reliable_job.ports.OutboxStore` or database."""

    def status(self) -> OutboxStatus: ...


class OutboxCollector(Collector):
    """``reliable_job_outbox_rows{state}``, ``reliable_job_oldest_pending_seconds`` and
    ``reliable_job_oldest_sent_seconds``, from one ``status()`` of the outbox per scrape (its
    cost on a large outbox is measured by ``make bench``: ``metrics_scrape_ms_1m``), and
    ``reliable_job_outbox_up`` (0 when the outbox could not be read; the other gauges are then
    left out of that scrape).

    The ages are 0 when no row is in that state, so an alert on them needs no ``absent()``.
    """

    def __init__(self, database: HasStatus) -> None:
        self.database = database

    def describe(self) -> Iterator[Metric]:
        """The families, without reading the outbox (registering must not query it)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        rows, pending, sent, up = self._families()
        try:
            status = self.database.status()
        except Exception as exc:
            logger.warning("metrics: could not read the outbox status: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        for state, count in (("pending", status.pending), ("sent", status.sent), ("dead", status.dead)):
            rows.add_metric([state], count)
        pending.add_metric([], status.oldest_pending_seconds or 0.0)
        sent.add_metric([], status.oldest_sent_seconds or 0.0)
        up.add_metric([], 1)
        yield from (rows, pending, sent, up)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "reliable_job_outbox_rows", "Outbox rows by state (read at scrape time).", labels=["state"]
            ),
            GaugeMetricFamily(
                "reliable_job_oldest_pending_seconds",
                "Age of the oldest pending row: jobs committed but not published yet (0: none).",
            ),
            GaugeMetricFamily(
                "reliable_job_oldest_sent_seconds",
                "Age of the oldest sent row: published, completion not recorded yet (0: none).",
            ),
            GaugeMetricFamily(
                "reliable_job_outbox_up", "1 when the last scrape could read the outbox, else 0."
            ),
        )
