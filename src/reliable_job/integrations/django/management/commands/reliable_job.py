"""``manage.py reliable_job relay | status [--json] [--check] | check | retry-dead | jobs ...``: the
``reliable-job`` command's database commands on the project's Django databases (``jobs list|show|
retry-dead|purge|publish-now``: the job tools of :mod:`reliable_job.cli.jobs`, on every outbox
alias or ``--database``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_job import cli
from reliable_job.cli import health
from reliable_job.cli import jobs as cli_jobs
from reliable_job.errors import ReliableJobError
from reliable_job.ports import JobFilter, JobRow


def _jobs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app", help="the Celery app, as module:attribute (default: found)")
    p.add_argument("--database", help="one database alias (default: every outbox)")


class AliasAdmin:
    """The job tools (:class:`~reliable_job.ports.OutboxAdmin`) on every outbox alias, or on one."""

    def __init__(self, outbox: Any, alias: str | None) -> None:
        self.outbox = outbox
        self.alias = alias

    def find_jobs(self, where: JobFilter, *, limit: int | None = None) -> Sequence[JobRow]:
        rows: Sequence[JobRow] = self.outbox.find_jobs(where, limit=limit, alias=self.alias)
        return rows

    def count_jobs(self, where: JobFilter) -> int:
        return int(self.outbox.count_jobs(where, alias=self.alias))

    def get_jobs(self, key: str) -> Sequence[JobRow]:
        rows: Sequence[JobRow] = self.outbox.get_jobs(key, alias=self.alias)
        return rows

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return int(
            self.outbox.change_jobs(action, where, batch_size=batch_size, progress=progress, alias=self.alias)
        )


class PlainWriter:
    """Django's ``OutputWrapper`` as a plain stream for the job tools, which ``print``: the
    wrapper ends every ``write`` with a newline, so ``print``'s own ``"\n"`` became a blank line
    after every line."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> Any:
        return self.wrapper.write(text, ending="")

    def flush(self) -> Any:
        return self.wrapper.flush()

    def isatty(self) -> bool:
        return bool(self.wrapper.isatty())


def runtime_for(spec: str | None) -> Any:
    """The Django runtime of the Celery app ``spec`` (``module:attribute``), or of the project's
    Celery app (the one the standard layout imports in ``proj/__init__.py``)."""
    from celery import _state

    from reliable_job.integrations.django.runtime import install, runtime_on

    if spec:
        return install(cli._load_app(spec))
    for app in list(_state._get_active_apps()):
        runtime = runtime_on(app)
        if runtime is not None:
            return runtime
    raise CommandError(
        "no Celery app with reliable-job found: import it in your project's __init__.py "
        "(Celery's Django layout) or pass --app module:attribute"
    )


class Command(BaseCommand):
    help = "reliable-job: run a relay, show the outbox status, retry dead jobs."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        relay = sub.add_parser("relay", help="publish staged jobs until SIGTERM/SIGINT")
        relay.add_argument("--batch-size", type=int)
        status = sub.add_parser("status", help="count pending, sent and dead rows")
        status.add_argument("--json", action="store_true", help="print one JSON object")
        status.add_argument("--check", action="store_true", help="as check: exit 1 past a threshold")
        check = sub.add_parser("check", help="exit 1 with one line per crossed threshold, else ok")
        for p in (status, check):
            health.add_threshold_options(p)
        relay.add_argument("--heartbeat-file", help="touch this file every pass and idle tick")
        retry = sub.add_parser("retry-dead", help="put dead rows back to pending")
        for p in (relay, status, check, retry):
            p.add_argument("--app", help="the Celery app, as celery -A takes it (default: found)")
        for p in (status, check, retry):
            p.add_argument("--database", help="one database alias (default: every outbox)")
        # -- job tools: jobs list|show|retry-dead|purge|publish-now (reliable_job.cli.jobs) --
        jobs = sub.add_parser("jobs", help="list, show, retry, purge and publish jobs")
        cli_jobs.add_jobs_arguments(jobs, _jobs_options)

    def handle(self, *args: Any, **options: Any) -> None:
        if not logging.getLogger().handlers:  # an entry point, like the reliable-job command
            level = {0: logging.WARNING, 1: logging.INFO}.get(options["verbosity"], logging.DEBUG)
            logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            runtime = runtime_for(options["app"])
            action = options["action"]
            if action == "relay":
                if options["batch_size"]:
                    runtime.settings = runtime.settings.replace(batch_size=options["batch_size"])
                if options["heartbeat_file"]:
                    runtime.settings = runtime.settings.replace(heartbeat_file=options["heartbeat_file"])
                cli.run_until_signalled(runtime.relay())
            elif action == "check" or (action == "status" and options["check"]):
                limits = health.Thresholds(
                    options["max_pending_age"],
                    options["max_sent_age"],
                    options["max_dead"],
                    options["max_relay_silence"],
                )
                read = lambda: runtime.database.status(options["database"])  # noqa: E731
                if health.run_check(read, limits, runtime.app, self.stdout.write):
                    sys.exit(1)
            elif action == "status":
                status = runtime.database.status(options["database"])
                self.stdout.write(cli.format_status(status, as_json=options["json"]))
            elif action == "jobs":
                admin = AliasAdmin(runtime.database, options["database"])
                status = cli_jobs.run_jobs(
                    argparse.Namespace(**options), admin, PlainWriter(self.stdout), PlainWriter(self.stderr)
                )
                if status:
                    raise CommandError(
                        f"jobs {options['jobs_command']}: exit status {status}", returncode=status
                    )
            else:
                self.stdout.write(cli.format_retried(runtime.database.retry_dead(options["database"])))
        except ReliableJobError as exc:
            raise CommandError(" ".join(str(exc).split())) from exc
