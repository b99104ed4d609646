"""The demo's broker outage (stopped mid-run, restarted by a timer) and its progress lines."""

from __future__ import annotations

import sys
import threading
import time

from reliable_job.demo.services import Broker


class Console:
    """The demo's progress lines, on stderr, stamped with the time since the start."""

    def __init__(self, started: float) -> None:
        self.started = started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        print(f"demo {self.elapsed():6.1f}s  {message}", file=sys.stderr, flush=True)


class Outage:
    """Stops the broker once ``at_staged`` jobs are staged; a timer starts it again ``seconds``
    later, whatever the staging loop is doing."""

    def __init__(self, broker: Broker, at_staged: int, seconds: float, console: Console) -> None:
        self.broker = broker
        self.at_staged = at_staged
        self.planned = seconds if broker.restartable else 0.0
        self.console = console
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._timer: threading.Timer | None = None
        self._error: Exception | None = None

    @property
    def active(self) -> bool:
        return self.started_at is not None and self.ended_at is None

    @property
    def seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def tick(self, staged: int) -> None:
        if self._error is not None:
            raise self._error
        if self.planned <= 0 or self.started_at is not None or staged < self.at_staged:
            return
        self.broker.stop()
        self.started_at = time.monotonic()
        self.console.say(f"redis DOWN: broker stopped after {staged} staged jobs; staging goes on")
        self._timer = threading.Timer(self.planned, self._end)
        self._timer.start()

    def _end(self) -> None:
        try:
            self.broker.start()
        except Exception as exc:
            self._error = exc
            return
        self.ended_at = time.monotonic()
        self.console.say(f"redis UP: broker restarted on the same port after {self.seconds:.1f}s")

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
