"""The ``reliable-job`` command: relay, status, check, migration, init-db, retry-dead, demo.

``-A/--app`` (before the command, as ``celery -A``; ``relay --app`` too) names the Celery app the
way Celery does (:mod:`reliable_job.cli.apps`); the database commands then take their settings
from it. ``celery -A proj reliable-job <command>`` runs the same commands through Celery's own
command line (:mod:`reliable_job.cli.celery_command`).

Other command families register in :func:`build_parser` with one line: a module's
``add_parser(sub)`` adds its subparser and sets ``func`` (and may read ``args.app`` through
:func:`app_of`, the database through :func:`database_of`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reliable_job.cli import health
from reliable_job.cli.apps import load_app, missing_extra, start_django_if_configured
from reliable_job.cli.jobs import add_jobs_commands
from reliable_job.errors import ConfigurationError, DatabaseUnavailable, ReliableJobError
from reliable_job.ports import OutboxStatus
from reliable_job.relay import Relay, RelayGroup
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)

_load_app = load_app
"""The former name (the Django management command's)."""


def app_of(args: argparse.Namespace, *, required: bool = False) -> Any:
    """The Celery app of ``-A/--app`` (or the one ``celery -A`` resolved), loaded once; ``None``
    when none was given and it is not ``required``."""
    app = getattr(args, "app_object", None)
    if app is None and getattr(args, "app", None):
        app = args.app_object = load_app(args.app)
    if app is not None:
        start_django_if_configured(app)
    if app is None and required:
        raise ConfigurationError(f"{args.command} needs the Celery app: reliable-job -A proj {args.command}")
    return app


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v
        for k, v in (("database_url", getattr(args, "database_url", None)), ("table_name", args.table))
        if v is not None
    }


def database_of(args: argparse.Namespace) -> Any:
    """The outbox database: the app's (its installed runtime's, or one built from its settings:
    ``Settings.load`` on the app's configuration) with ``-A``, else one from ``RELIABLE_JOB_*``;
    ``--database-url`` and ``--table`` over either."""
    from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase

    app = app_of(args)
    overrides = _overrides(args)
    if app is None:
        return SQLAlchemyDatabase(Settings.from_env(**overrides))
    runtime = getattr(app, "reliable_job", None)
    if runtime is not None and not overrides:
        return runtime.database
    if runtime is not None:
        settings = runtime.settings
    else:
        from reliable_job.integrations.celery.config import load_settings

        settings = load_settings(app)
    return SQLAlchemyDatabase(settings.replace(**overrides))


# Kept for code that called it (tests, the bench): the database from the options, no app.
_database = database_of


def cmd_relay(args: argparse.Namespace) -> int:
    from reliable_job.integrations.celery import install

    app = app_of(args, required=True)
    runtime = getattr(app, "reliable_job", None)
    overrides = {
        k: v
        for k, v in (
            ("database_url", args.database_url),
            ("table_name", args.table),
            ("batch_size", args.batch_size),
            ("heartbeat_file", args.heartbeat_file),
        )
        if v is not None
    }
    if runtime is None:
        runtime = install(app, **overrides)
    elif overrides:
        runtime = install(app, settings=runtime.settings.replace(**overrides))
    try:
        app.connection_for_write().get_transport_cls()  # validates the broker URL
    except Exception as exc:
        raise ReliableJobError(f"bad broker URL: {type(exc).__name__}: {exc}") from exc
    relay = runtime.relay()
    if args.metrics_port:
        serve_metrics(args.metrics_port, args.metrics_addr, runtime.database)
    run_until_signalled(relay)
    return 0


def serve_metrics(port: int, addr: str, database: Any) -> None:
    """``/metrics`` on ``addr:port`` for this relay process (the ``metrics`` extra)."""
    try:
        from reliable_job.integrations.prometheus import serve
    except ImportError:
        raise ReliableJobError(
            "--metrics-port needs prometheus_client: pip install 'reliable-job[metrics]'"
        ) from None
    try:
        serve(port, addr, database=database)
    except OSError as exc:
        raise ReliableJobError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc


def preflight(relay: Relay | RelayGroup) -> None:
    """Before relaying: a permanently wrong database configuration (authentication refused,
    unknown database, missing outbox table) raises, so the relay exits with one line; a database
    or broker that is only unreachable is logged in one line and waited out by the relay."""
    for each in relay.relays if isinstance(relay, RelayGroup) else [relay]:
        probe = getattr(each.store, "probe", None)
        if probe is None:
            continue
        try:
            probe()
        except DatabaseUnavailable as exc:
            logger.warning("outbox database unreachable, waiting for it: %s", " ".join(str(exc).split()))
    first = relay.relays[0] if isinstance(relay, RelayGroup) else relay
    try:
        first.broker.connect()
    except ReliableJobError as exc:
        logger.warning("broker unreachable, waiting for it: %s", " ".join(str(exc).split()))


def run_until_signalled(relay: Relay | RelayGroup) -> None:
    """Run ``relay`` until SIGTERM or SIGINT; the batch in flight is finished first.

    First :func:`preflight`: a permanently wrong database configuration raises (the command exits
    with one line), an unreachable database or broker is logged once and waited out."""
    preflight(relay)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)

    # The relay runs in a thread of its own and the main thread only waits for it and takes the
    # signals: a handler runs in the main thread between two bytecodes, and had the relay been
    # running there, relay.stop() could wait for a lock the interrupted code held (the idle wait's,
    # an Event's condition): a relay that never exits after SIGTERM.
    worker = threading.Thread(target=run, name="reliable-job-relay")

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: finishing the batch in flight", signum)
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]


def cmd_status(args: argparse.Namespace) -> int:
    if args.check:
        return cmd_check(args)
    print(format_status(database_of(args).status(), as_json=args.json))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """One line per failed check, exit 1; one ``ok ...`` line, exit 0 (a probe)."""
    app = app_of(args)
    limits = health.Thresholds.from_args(args)
    return health.run_check(lambda: database_of(args).status(), limits, app)


def format_status(status: OutboxStatus, *, as_json: bool) -> str:
    """What ``status`` prints: one JSON object, or one line per count (and per relay)."""
    if as_json:
        return json.dumps(status.health_dict())

    def age(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    lines = [
        f"pending: {status.pending}",
        f"sent (awaiting completion): {status.sent}",
        f"dead: {status.dead}",
        f"oldest pending: {age(status.oldest_pending_seconds)}",
        f"oldest sent: {age(status.oldest_sent_seconds)}",
    ]
    if status.estimated:
        lines.append("(counts above 50000 are the planner's estimates)")
    for relay in status.relays:
        ago = relay.get("last_pass_seconds_ago")
        seconds = ago if isinstance(ago, (int, float)) else None
        outage = f", outage since {relay['outage_since']}" if relay.get("outage_since") else ""
        mode = "listening" if relay.get("listening") else "polling"
        lines.append(
            f"relay {relay['relay_id']}: last pass {age(seconds)} ago, "
            f"{relay['published']} published, {mode}{outage}"
        )
    return "\n".join(lines)


def cmd_migration(args: argparse.Namespace) -> int:
    from reliable_job.integrations.sqlalchemy.migration import alembic_relays_revision, alembic_revision, ddl

    table = args.table or Settings.from_env().table_name
    if args.alembic_dir is None:
        sys.stdout.write(ddl(args.dialect, table))
        return 0
    revision = args.revision or uuid.uuid4().hex[:12]
    directory = Path(args.alembic_dir)
    if not directory.is_dir():
        raise ReliableJobError(f"{directory} is not a directory (point it at alembic/versions)")
    if args.relays_table_only:
        path = directory / f"{revision}_create_{table}_relays.py"
        path.write_text(alembic_relays_revision(revision, args.down_revision, table))
    else:
        path = directory / f"{revision}_create_{table}.py"
        path.write_text(alembic_revision(revision, args.down_revision, table))
    print(path)
    return 0


def cmd_init_db(args: argparse.Namespace) -> int:
    database = database_of(args)
    if not hasattr(database, "create_table"):
        raise ConfigurationError("this app's outbox is Django's: create it with manage.py migrate")
    database.create_table()
    print(f"created table {database.table.name} (if it did not exist)")
    return 0


def cmd_retry_dead(args: argparse.Namespace) -> int:
    print(format_retried(database_of(args).retry_dead()))
    return 0


def format_retried(count: int) -> str:
    return f"{count} dead job(s) back to pending"


def cmd_demo(args: argparse.Namespace) -> int:
    from reliable_job.demo import run_demo

    return int(run_demo(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reliable-job", description="Transactional, durable background jobs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "-A",
        "--app",
        help="the Celery app, as celery -A takes it: proj, proj.celery, proj:app, proj.celery:app",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def db_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="outbox database (default: RELIABLE_JOB_DATABASE_URL)")
        p.add_argument("--table", help="outbox table name (default: reliable_job_outbox)")

    p = sub.add_parser("relay", help="publish staged jobs to the broker until SIGTERM/SIGINT")
    p.add_argument("--app", default=argparse.SUPPRESS, help="the Celery app (as -A before the command)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--heartbeat-file", help="touch this file every pass and idle tick (liveness probe)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (extra: metrics)")
    p.add_argument("--metrics-addr", default="0.0.0.0", help="metrics address (default: all interfaces)")  # noqa: S104
    db_options(p)
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("status", help="count pending, sent and dead rows; the relays' last passes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="as `check`: exit 1 when a threshold is crossed")
    health.add_threshold_options(p)
    db_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="exit 1 with one line per crossed threshold, else print ok (a probe)")
    health.add_threshold_options(p)
    db_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("migration", help="print DDL, or write an Alembic revision")
    p.add_argument("--dialect", default="postgresql", help="postgresql or sqlite (for DDL)")
    p.add_argument("--alembic-dir", help="write an Alembic revision into this versions directory")
    p.add_argument("--revision", help="revision id (default: random)")
    p.add_argument("--down-revision", help="the revision this one follows")
    p.add_argument(
        "--relays-table-only",
        action="store_true",
        help="a revision adding only <table>_relays (to an outbox an earlier revision created)",
    )
    p.add_argument("--table", help="outbox table name")
    p.set_defaults(func=cmd_migration)

    p = sub.add_parser("init-db", help="create the outbox table")
    db_options(p)
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("retry-dead", help="put dead rows back to pending")
    db_options(p)
    p.set_defaults(func=cmd_retry_dead)
    add_jobs_commands(sub, db_options)  # jobs list|show|retry-dead|purge|publish-now (cli/jobs.py)

    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults")
    p.add_argument("--database-url", help="use this database instead of a temporary SQLite file")
    p.add_argument("--redis-url", help="use this Redis instead of starting an embedded server")
    p.add_argument("--jobs", type=int, default=3000, help="jobs to stage (default 3000)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, *, app: Any = None) -> int:
    """The command line; ``app``: a Celery app already resolved (``celery -A proj reliable-job``)."""
    args = build_parser().parse_args(argv)
    if app is not None:
        args.app_object = app
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except ReliableJobError as exc:
        print(f"reliable-job: error: {' '.join(str(missing_extra(exc) or exc).split())}", file=sys.stderr)
        return 2
    except ImportError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(f"reliable-job: error: {extra}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
