"""``reliable-job check`` and ``status --check``: thresholds over the outbox's status, one line per
failed check, exit 1; ``ok ...`` and exit 0 when healthy (a Kubernetes exec probe)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reliable_job.errors import DatabaseMisconfigured, ReliableJobError
from reliable_job.ports import OutboxStatus


@dataclass(frozen=True)
class Thresholds:
    max_pending_age: float | None = None
    max_sent_age: float | None = None
    max_dead: int | None = None
    max_relay_silence: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Thresholds:
        return cls(
            getattr(args, "max_pending_age", None),
            getattr(args, "max_sent_age", None),
            getattr(args, "max_dead", None),
            getattr(args, "max_relay_silence", None),
        )


def add_threshold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pending-age", type=float, metavar="SECONDS", help="oldest pending job at most this old"
    )
    p.add_argument(
        "--max-sent-age",
        type=float,
        metavar="SECONDS",
        help="oldest published, not yet completed job at most this old",
    )
    p.add_argument("--max-dead", type=int, metavar="N", help="at most N dead jobs")
    p.add_argument(
        "--max-relay-silence",
        type=float,
        metavar="SECONDS",
        help="some relay passed within this many seconds (from <table>_relays)",
    )


def failed_checks(status: OutboxStatus, limits: Thresholds) -> list[str]:
    """One line per threshold ``status`` crosses."""
    failed = []
    pending_age = status.oldest_pending_seconds
    max_pending = limits.max_pending_age
    if max_pending is not None and pending_age is not None and pending_age > max_pending:
        failed.append(
            f"pending too long: the oldest pending job is {pending_age:.0f}s old "
            f"(--max-pending-age {limits.max_pending_age:g}): relays down or too slow"
        )
    sent_age = status.oldest_sent_seconds
    if limits.max_sent_age is not None and sent_age is not None and sent_age > limits.max_sent_age:
        failed.append(
            f"sent too long: the oldest job published and not completed is {sent_age:.0f}s old "
            f"(--max-sent-age {limits.max_sent_age:g}): workers down, stuck, or not completing"
        )
    if limits.max_dead is not None and status.dead > limits.max_dead:
        failed.append(f"too many dead jobs: {status.dead} (--max-dead {limits.max_dead})")
    if limits.max_relay_silence is not None:
        ages = [r["last_pass_seconds_ago"] for r in status.relays]
        known = [float(a) for a in ages if isinstance(a, (int, float))]
        if not known:
            failed.append(
                "no relay has reported a pass (relays write <table>_relays every heartbeat_interval)"
            )
        elif min(known) > limits.max_relay_silence:
            failed.append(
                f"relays silent: the last relay pass was {min(known):.0f}s ago "
                f"(--max-relay-silence {limits.max_relay_silence:g})"
            )
    return failed


def summary(status: OutboxStatus) -> str:
    def age(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    return (
        f"ok pending={status.pending} sent={status.sent} dead={status.dead} "
        f"oldest_pending={age(status.oldest_pending_seconds)} "
        f"oldest_sent={age(status.oldest_sent_seconds)} relays={len(status.relays)}"
    )


def broker_problem(app: Any) -> str | None:
    """Why the app's broker cannot be reached (one try, a few seconds), or ``None``."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:
        return f"broker unreachable: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def run_check(
    read_status: Callable[[], OutboxStatus],
    limits: Thresholds,
    app: Any | None,
    out: Callable[[str], object] = print,
) -> int:
    """Print one line per failed check (or one ``ok`` line); 1 when a check failed, else 0."""
    failed: list[str] = []
    status = None
    try:
        status = read_status()
    except DatabaseMisconfigured as exc:  # a refused login, an unknown database, no table
        failed.append(f"database refuses the configuration: {' '.join(str(exc).split())}")
    except ReliableJobError as exc:
        failed.append(f"database unreachable: {' '.join(str(exc).split())}")
    if status is not None:
        failed += failed_checks(status, limits)
    if app is not None:
        problem = broker_problem(app)
        if problem:
            failed.append(problem)
    for line in failed:
        out(line)
    if failed:
        return 1
    assert status is not None
    out(summary(status))
    return 0
