"""The ``reliable-job`` command: relay, status, migration, init-db, retry-dead, demo."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reliable_job.cli_jobs import add_jobs_commands
from reliable_job.errors import ReliableJobError
from reliable_job.ports import OutboxStatus
from reliable_job.relay import Relay, RelayGroup
from reliable_job.settings import Settings

logger = logging.getLogger(__name__)


def _database(args: argparse.Namespace) -> Any:
    from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase

    return SQLAlchemyDatabase(Settings.from_env(database_url=args.database_url, table_name=args.table))


def _load_app(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attr or "app")
    except (ImportError, AttributeError) as exc:
        raise ReliableJobError(f"cannot load the Celery app {spec!r}: {exc}") from exc
    return app


def cmd_relay(args: argparse.Namespace) -> int:
    from reliable_job.integrations.celery import install

    app = _load_app(args.app)
    runtime = getattr(app, "reliable_job", None)
    overrides = {
        k: v
        for k, v in (
            ("database_url", args.database_url),
            ("table_name", args.table),
            ("batch_size", args.batch_size),
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


def run_until_signalled(relay: Relay | RelayGroup) -> None:
    """Run ``relay`` until SIGTERM or SIGINT; the batch in flight is finished first."""

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: finishing the batch in flight", signum)
        relay.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay.run()


def cmd_status(args: argparse.Namespace) -> int:
    print(format_status(_database(args).status(), as_json=args.json))
    return 0


def format_status(status: OutboxStatus, *, as_json: bool) -> str:
    """What ``status`` prints: one JSON object, or one line per count."""
    if as_json:
        return json.dumps(status.as_dict())
    age = status.oldest_pending_seconds
    return "\n".join(
        [
            f"pending: {status.pending}",
            f"sent (awaiting completion): {status.sent}",
            f"dead: {status.dead}",
            f"oldest pending: {'-' if age is None else f'{age:.1f}s'}",
        ]
    )


def cmd_migration(args: argparse.Namespace) -> int:
    from reliable_job.integrations.sqlalchemy.migration import alembic_revision, ddl

    table = args.table or Settings.from_env().table_name
    if args.alembic_dir is None:
        sys.stdout.write(ddl(args.dialect, table))
        return 0
    revision = args.revision or uuid.uuid4().hex[:12]
    directory = Path(args.alembic_dir)
    if not directory.is_dir():
        raise ReliableJobError(f"{directory} is not a directory (point it at alembic/versions)")
    path = directory / f"{revision}_create_{table}.py"
    path.write_text(alembic_revision(revision, args.down_revision, table))
    print(path)
    return 0


def cmd_init_db(args: argparse.Namespace) -> int:
    database = _database(args)
    database.create_table()
    print(f"created table {database.table.name} (if it did not exist)")
    return 0


def cmd_retry_dead(args: argparse.Namespace) -> int:
    print(format_retried(_database(args).retry_dead()))
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
    sub = parser.add_subparsers(dest="command", required=True)

    def db_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="outbox database (default: RELIABLE_JOB_DATABASE_URL)")
        p.add_argument("--table", help="outbox table name (default: reliable_job_outbox)")

    p = sub.add_parser("relay", help="publish staged jobs to the broker until SIGTERM/SIGINT")
    p.add_argument("--app", required=True, help="the Celery app, as module:attribute")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (extra: metrics)")
    p.add_argument("--metrics-addr", default="0.0.0.0", help="metrics address (default: all interfaces)")  # noqa: S104
    db_options(p)
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("status", help="count pending, sent and dead rows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    db_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("migration", help="print DDL, or write an Alembic revision")
    p.add_argument("--dialect", default="postgresql", help="postgresql or sqlite (for DDL)")
    p.add_argument("--alembic-dir", help="write an Alembic revision into this versions directory")
    p.add_argument("--revision", help="revision id (default: random)")
    p.add_argument("--down-revision", help="the revision this one follows")
    p.add_argument("--table", help="outbox table name")
    p.set_defaults(func=cmd_migration)

    p = sub.add_parser("init-db", help="create the outbox table")
    db_options(p)
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("retry-dead", help="put dead rows back to pending")
    db_options(p)
    p.set_defaults(func=cmd_retry_dead)
    add_jobs_commands(sub, db_options)  # jobs list|show|retry-dead|purge|publish-now (cli_jobs.py)

    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults")
    p.add_argument("--database-url", help="use this database instead of a temporary SQLite file")
    p.add_argument("--redis-url", help="use this Redis instead of starting an embedded server")
    p.add_argument("--jobs", type=int, default=3000, help="jobs to stage (default 3000)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except ReliableJobError as exc:
        print(f"reliable-job: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
