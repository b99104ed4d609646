"""How an idle relay waits for its next pass: on a wake-up source when one works, polling otherwise.

The wake-up source (:class:`~reliable_job.ports.Wakeup`, PostgreSQL ``LISTEN``) is opened lazily.
When it cannot be opened, or fails while waiting, the relay logs it once, polls, and tries to
listen again ``listen_retry`` seconds later. A source that says the database has no notifications
(``None``) is never asked again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from reliable_job.ports import Wakeup

logger = logging.getLogger("reliable_job.relay")
"""The relay's logger: these lines are the relay's to its operators."""


class IdleWait:
    """The waits of one relay between passes."""

    def __init__(
        self,
        listen: Callable[[], Wakeup | None] | None,
        stopping: threading.Event,
        *,
        poll_interval: float,
        listen_retry: float,
        clock: Callable[[], float],
        wait: Callable[[threading.Event, float], object],
    ) -> None:
        self._listen = listen
        self._stopping = stopping
        self._poll_interval = poll_interval
        self.listen_retry = listen_retry
        self._clock = clock
        self._wait = wait
        self._listen_at = float("-inf")
        self._listen_failed = False
        self._wakeup: Wakeup | None = None
        self._lock = threading.Lock()
        self.wakeups = 0
        """Notifications that ended a wait."""

    @property
    def listening(self) -> bool:
        return self._wakeup is not None

    @property
    def listens(self) -> bool:
        return self._listen is not None

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; ``True`` when a notification ended the wait."""
        wakeup = self._current()
        if wakeup is None:
            self._wait(self._stopping, seconds)
            return False
        try:
            notified = wakeup.wait(seconds)
        except Exception as exc:
            logger.warning(
                "relay stopped listening for new jobs, polling every %.2fs: %s",
                self._poll_interval,
                exc,
            )
            self.close()
            self._listen_at = self._clock() + self.listen_retry
            self._listen_failed = True
            return False
        if notified:
            self.wakeups += 1
        return bool(notified)

    def _current(self) -> Wakeup | None:
        if self._wakeup is not None or self._listen is None or self._clock() < self._listen_at:
            return self._wakeup
        try:
            wakeup = self._listen()
        except Exception as exc:
            self._listen_at = self._clock() + self.listen_retry
            if not self._listen_failed:
                logger.warning(
                    "relay cannot listen for new jobs, polling every %.2fs instead: %s",
                    self._poll_interval,
                    exc,
                )
            self._listen_failed = True
            return None
        if wakeup is None:  # this database has no notifications: poll, and never ask again
            self._listen = None
            return None
        if self._listen_failed:
            logger.warning("relay listening for new jobs again")
            self._listen_failed = False
        with self._lock:
            self._wakeup = wakeup
            if self._stopping.is_set():
                wakeup.interrupt()
        return wakeup

    def interrupt(self) -> None:
        """End the wait in progress, or the next one (the relay is stopping)."""
        with self._lock:
            if self._wakeup is not None:
                self._wakeup.interrupt()

    def close(self) -> None:
        with self._lock:
            wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            try:
                wakeup.close()
            except Exception:
                logger.debug("error closing the relay's listening connection", exc_info=True)
