"""The project's child-process toolkit, for the demo, the tests and the benchmark harness.

They all run real ``celery worker`` and ``reliable-job relay`` processes, and all need the same
few things done right: start a command with its output in a log file, wait until the log says it
is ready (and show the end of the log when it never does), stop it (a signal, then SIGKILL), reap
it, and never leave a process behind, not even the pool children a killed worker forked. One
implementation here, standard library only, so that a fix to any of these reaches every caller.

A :class:`Process` runs in a session (process group) of its own: a signal sent on purpose goes to
the process alone (a celery worker's warm shutdown is its own business), while SIGKILL, and the
clean-up once it has exited, go to the whole group. POSIX only, like the processes it runs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

REAP_TIMEOUT = 10.0
#: How long a process gets to log its stacks after the ``dump_signal`` of :meth:`Process.stop`.
STACK_DUMP_WAIT = 2.0
"""How long SIGKILL may take to end a process before it counts as stuck."""
_POLL = 0.02


class ProcessExited(RuntimeError):
    """The process ended while the caller was waiting for it to get ready."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return that.

    Raises :class:`TimeoutError` naming ``message`` after ``timeout`` seconds. Exceptions of the
    predicate propagate: a predicate raises to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """One child process started now, its stdout and stderr in ``log_path``.

    Use it as a context manager (or call :meth:`close`): leaving kills whatever is still running
    of it. ``poll``, ``wait`` and ``pid`` behave like :class:`subprocess.Popen`'s."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.name = name or self.log_path.stem
        self.peak_rss_mib: float | None = None
        """The process's peak resident set size once it has been reaped (Linux: exact)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                env=None if env is None else dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._status: int | None = None

    def __repr__(self) -> str:
        state = "running" if self._status is None else f"exit status {self._status}"
        return f"<Process {self.name} pid {self.pid}, {state}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    # -- state ----------------------------------------------------------------------------------

    def poll(self) -> int | None:
        """The exit status (``-N`` for signal N) once the process has ended, else None."""
        return self._reap(0.0)

    def alive(self) -> bool:
        return self.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Reap the process; :class:`TimeoutError` if it is still running after ``timeout``."""
        status = self._reap(timeout)
        if status is None:
            raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout:g}s")
        return status

    def _reap(self, timeout: float | None) -> int | None:
        if self._status is not None:
            return self._status
        deadline = None if timeout is None else time.monotonic() + timeout
        while os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_POLL)
        # Exited but not reaped yet: its process group id cannot have been reused, so whatever it
        # left in the group (a prefork pool, a server's reloader child) can safely go now.
        self._kill_group()
        _, status, usage = os.wait4(self.pid, 0)
        self._status = self._popen.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_mib = usage.ru_maxrss / 1024  # KiB on Linux
        return self._status

    # -- the log ----------------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the log."""
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except OSError:
            return ""

    def wait_until(
        self, predicate: Callable[[], T | None], timeout: float = 60.0, message: str = "it to get ready"
    ) -> T:
        """:func:`wait_for` ``predicate`` while this process runs; if it exits first
        (:class:`ProcessExited`) or time runs out (:class:`TimeoutError`), the error carries the
        end of the log."""

        def check() -> T | None:
            value = predicate()
            if not value and self.poll() is not None:
                raise ProcessExited(
                    f"{self.name} exited with status {self._status} while waiting for {message}; "
                    f"{self._tail_report()}"
                )
            return value

        try:
            return wait_for(check, timeout=timeout, interval=0.05, message=f"{message} ({self.name})")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self._tail_report()}") from None

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until a line of the log matches ``pattern`` (a regular expression); the match."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        return self.wait_until(lambda: regex.search(self.log()), timeout, f"/{regex.pattern}/ in its log")

    def _tail_report(self, lines: int = 25) -> str:
        return f"last lines of {self.log_path}:\n{self.log_tail(lines)}"

    # -- stopping ---------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process alone (not its group), unless it has been reaped."""
        if self._status is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(
        self,
        sig: int = signal.SIGTERM,
        timeout: float = 30.0,
        *,
        strict: bool = False,
        dump_signal: int | None = None,
    ) -> int:
        """Send ``sig``, wait up to ``timeout`` seconds for the exit; return the exit status.

        Still running then: ``dump_signal`` first if given (a signal that makes the process log
        its threads' stacks, as SIGABRT does to a Python process with ``PYTHONFAULTHANDLER=1``, so
        the report shows where it hung), SIGKILL to the whole group, and either a warning and the
        (``-9``) status or, with ``strict``, :class:`TimeoutError` (the tests: a process that
        ignores SIGTERM is a failure, not something to paper over)."""
        if self.poll() is None:
            self.send_signal(sig)
        status = self._reap(timeout)
        if status is not None:
            return status
        logger.warning("%s did not exit within %gs of %s: killing it", self.name, timeout, _name(sig))
        if dump_signal is not None:
            self.send_signal(dump_signal)
            self._reap(STACK_DUMP_WAIT)  # time to log the stacks (it may exit meanwhile)
        status = self.kill()
        if strict:
            raise TimeoutError(
                f"{self.name} still ran {timeout:g}s after {_name(sig)} (killed); "
                f"{self._tail_report(150 if dump_signal is not None else 25)}"
            )
        return status

    def kill(self) -> int:
        """SIGKILL to the whole group, then reap; the exit status."""
        if self._status is None:
            self._kill_group()
        return self.wait(REAP_TIMEOUT)

    def close(self) -> None:
        """Kill and reap whatever is still running: nothing is left behind."""
        if self.poll() is None:
            self.kill()

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _kill_group(self) -> None:
        # Only while the leader is not reaped (running or a zombie): the group id is still ours.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
