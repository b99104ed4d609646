"""A relay's signs of life: a file touched every pass and idle tick, a row in the database.

The file (``heartbeat_file``) is for a liveness probe on the relay's own host: its mtime advances
while the relay loop runs, outages included (an outage is for ``reliable-job check`` to report,
not a reason to restart the process). The row (``<table>_relays``, written through the store when
it implements :class:`RelayRecorder`) is for ``reliable-job status`` and ``check
--max-relay-silence`` anywhere: the relay's last pass, published count, listening flag and outage.
It is written at most every ``heartbeat_interval`` seconds, so a relay pass costs nothing more
than an ``os.utime`` most of the time.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from reliable_job.schema import RELAY_PRUNE_AFTER

logger = logging.getLogger(__name__)

FILE_TOUCH_INTERVAL = 1.0
"""Shortest time, in seconds, between two touches of the heartbeat file (a hot relay passes every
few milliseconds; probes look at ages in tens of seconds)."""

PRUNE_EVERY = 3600.0
"""Seconds between two prunes of silent relays' rows by one relay."""


@dataclass(frozen=True)
class RelayBeat:
    """One relay's row in ``<table>_relays``."""

    relay_id: str
    started_at: datetime
    last_pass_at: datetime | None
    beat_at: datetime
    published: int
    listening: bool
    outage_since: datetime | None

    def as_dict(self, now: datetime | None = None) -> dict[str, object]:
        now = now or datetime.now(timezone.utc)
        silence = None if self.last_pass_at is None else max(0.0, (now - self.last_pass_at).total_seconds())
        return {
            "relay_id": self.relay_id,
            "started_at": self.started_at.isoformat(),
            "last_pass_at": None if self.last_pass_at is None else self.last_pass_at.isoformat(),
            "last_pass_seconds_ago": silence,
            "published": self.published,
            "listening": self.listening,
            "outage_since": None if self.outage_since is None else self.outage_since.isoformat(),
        }


@runtime_checkable
class RelayRecorder(Protocol):
    """A store that keeps the relays' heartbeats (optional: without it only the file is touched)."""

    def record_relay(self, beat: RelayBeat, prune_before: datetime | None) -> None:
        """Insert or update ``beat``'s row; with ``prune_before``, also delete the rows of relays
        that have not written since then. Raises when the database fails."""

    def forget_relay(self, relay_id: str) -> None:
        """Delete the relay's row (it stopped cleanly)."""

    def relays(self) -> list[RelayBeat]:
        """Every relay's row (an empty list when the heartbeat table does not exist)."""


def new_relay_id() -> str:
    """``host:pid:random``: unique per relay, and says where to look."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Touches the heartbeat file and writes the relay's row, each at its own pace."""

    def __init__(
        self,
        store: object,
        *,
        interval: float,
        path: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recorder = store if isinstance(store, RelayRecorder) and interval > 0 else None
        self.interval = interval
        self.path = Path(path) if path else None
        self.relay_id = new_relay_id()
        self.started_at = _now()
        self.last_pass_at: datetime | None = None
        self._clock = clock
        self._next_write = float("-inf")
        self._next_touch = float("-inf")
        self._next_prune = float("-inf")
        self._written = False

    def passed(self) -> None:
        """A pass succeeded (found rows or not)."""
        self.last_pass_at = _now()

    def beat(self, *, published: int, listening: bool, outage_since: datetime | None) -> None:
        """Each loop turn: touch the file, and write the row when ``interval`` has passed. Never
        raises: a failed write is retried at the next interval (the relay's own pass reports
        outages)."""
        now = self._clock()
        if self.path is not None and now >= self._next_touch:
            self._next_touch = now + min(FILE_TOUCH_INTERVAL, self.interval or FILE_TOUCH_INTERVAL)
            self._touch()
        if self.recorder is None or now < self._next_write:
            return
        self._next_write = now + self.interval
        wall = _now()
        prune = None
        if now >= self._next_prune:
            prune = wall - timedelta(seconds=RELAY_PRUNE_AFTER)
        beat = RelayBeat(
            self.relay_id, self.started_at, self.last_pass_at, wall, published, listening, outage_since
        )
        try:
            self.recorder.record_relay(beat, prune)
        except Exception as exc:
            logger.debug("relay heartbeat not written: %s", exc)
            return
        if prune is not None:
            self._next_prune = now + PRUNE_EVERY
        self._written = True

    def stopped(self) -> None:
        """The relay stopped cleanly: its row goes (a killed relay's row is pruned later)."""
        if self.recorder is None or not self._written:
            return
        try:
            self.recorder.forget_relay(self.relay_id)
        except Exception as exc:
            logger.debug("relay heartbeat row not deleted: %s", exc)

    def _touch(self) -> None:
        assert self.path is not None
        try:
            self.path.touch()
        except OSError as exc:
            logger.warning("cannot touch the heartbeat file %s: %s", self.path, exc)


def _now() -> datetime:
    return datetime.now(timezone.utc)
