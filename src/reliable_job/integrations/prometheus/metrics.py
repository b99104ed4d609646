"""The counters, the histogram and the gauge of reliable-job, fed by its signals.

Metrics are one consumer of :mod:`reliable_job.signals`: a :class:`Metrics` connects one receiver
per signal, so the relay, staging and completion know nothing of Prometheus, and cost nothing more
than a truthiness check when no metrics are installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from reliable_job import signals
from reliable_job.ports import ClaimedRow, StagedJob

logger = logging.getLogger(__name__)

DEAD_REASONS = ("publish", "final_failure", "never_completed")
OUTCOMES = ("succeeded", "failed")
"""Outcomes shown from the start (0 until one happens); others appear when they first occur."""
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""``reliable_job_relay_pass_seconds`` buckets: a busy pass takes milliseconds, an outage's seconds."""


class Metrics:
    """reliable-job's counters on one registry, and the signal receivers that move them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.published = Counter(
            "reliable_job_published", "Jobs the relay published to the broker.", registry=registry
        )
        self.publish_errors = Counter(
            "reliable_job_publish_errors",
            "Rows the broker refused (retried with backoff) and relay passes failed by a broker outage.",
            registry=registry,
        )
        self.dead = Counter(
            "reliable_job_dead",
            "Rows set dead, by reason: publish (publish attempts exhausted), final_failure (the task "
            "failed for good, preserve_dead_jobs), never_completed (delivered max_publish_attempts times).",
            ["reason"],
            registry=registry,
        )
        self.redelivered = Counter(
            "reliable_job_redelivered",
            "Published jobs put back to pending: lost by the broker, or not completed after redeliver_after.",
            registry=registry,
        )
        self.relay_passes = Counter(
            "reliable_job_relay_passes", "Relay passes (empty ones included).", registry=registry
        )
        self.relay_pass_seconds = Histogram(
            "reliable_job_relay_pass_seconds",
            "Duration of a relay pass: claim, publish, mark sent, commit.",
            buckets=PASS_BUCKETS,
            registry=registry,
        )
        self.relay_last_pass = Gauge(
            "reliable_job_relay_last_pass_timestamp_seconds",
            "When a relay pass last ended (Unix time): a relay that stopped passing is stuck or down.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.staged = Counter(
            "reliable_job_staged",
            "Jobs written to the outbox by this process, by task (counted before the transaction commits).",
            ["task"],
            registry=registry,
        )
        self.completed = Counter(
            "reliable_job_completed",
            "Staged jobs whose outcome a worker reported, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for reason in DEAD_REASONS:
            self.dead.labels(reason)
        for outcome in OUTCOMES:
            self.completed.labels(outcome)
        self._receivers = (
            (signals.job_staged, self.on_staged),
            (signals.job_published, self.on_published),
            (signals.job_publish_failed, self.on_publish_failed),
            (signals.job_dead, self.on_dead),
            (signals.job_redelivered, self.on_redelivered),
            (signals.job_completed, self.on_completed),
            (signals.relay_pass, self.on_relay_pass),
        )

    def connect(self) -> Metrics:
        """Start counting (idempotent)."""
        for signal, receiver in self._receivers:
            signal.connect(receiver, weak=False)
        return self

    def disconnect(self) -> None:
        """Stop counting."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)

    # -- the receivers ---------------------------------------------------------------------------

    def on_staged(self, sender: object, *, jobs: Sequence[StagedJob], **_: Any) -> None:
        if len(jobs) == 1:
            self.staged.labels(jobs[0].task_name).inc()
            return
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.task_name] = counts.get(job.task_name, 0) + 1
        for task, n in counts.items():
            self.staged.labels(task).inc(n)

    def on_published(self, sender: object, *, rows: Sequence[ClaimedRow], **_: Any) -> None:
        self.published.inc(len(rows))

    def on_publish_failed(self, sender: object, *, failures: Sequence[object], **_: Any) -> None:
        self.publish_errors.inc(len(failures) or 1)

    def on_dead(self, sender: object, *, reason: str, count: int, **_: Any) -> None:
        self.dead.labels(reason).inc(count)

    def on_redelivered(self, sender: object, *, count: int, **_: Any) -> None:
        self.redelivered.inc(count)

    def on_completed(self, sender: object, *, outcome: str, job_ids: Sequence[str], **_: Any) -> None:
        self.completed.labels(outcome).inc(len(job_ids))

    def on_relay_pass(self, sender: object, *, duration: float, **_: Any) -> None:
        self.relay_passes.inc()
        self.relay_pass_seconds.observe(duration)
        self.relay_last_pass.set_to_current_time()
