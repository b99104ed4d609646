"""``reliable-job jobs list | show | retry-dead | purge | publish-now``: the job tools.

The commands read and change the outbox through :class:`~reliable_job.ports.OutboxAdmin` (the
SQLAlchemy store here; Django's ``manage.py reliable_job jobs`` runs the same commands on its
databases). Changes go in batches, each its own short transaction; on a terminal, progress goes
to stderr, and a final count line always goes to stdout. ``jobs show`` decodes the stored message
through the Celery adapter (:mod:`reliable_job.integrations.celery.display`): JSON bodies are
decoded, any other serializer is shown as opaque and never deserialized.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from reliable_job import schema
from reliable_job.errors import ReliableJobError
from reliable_job.ports import JobAction, JobFilter, JobRow, OutboxAdmin

DEFAULT_BATCH = 1000
DEFAULT_LIST_LIMIT = 100
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _Stream(Protocol):
    def write(self, text: str) -> Any: ...

    def flush(self) -> Any: ...

    def isatty(self) -> bool: ...


def parse_duration(text: str) -> float:
    """``90s``, ``3h``, ``7d``, ``2w``, ``15m`` (minutes), or plain seconds: seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 3h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- the parser ------------------------------------------------------------------------------------


def add_filter_options(p: argparse.ArgumentParser, *, states: bool = True, keys: bool = False) -> None:
    if states:
        p.add_argument(
            "--state",
            action="append",
            choices=schema.STATES,
            help="rows in this state (repeat for several; default: every state)",
        )
    p.add_argument("--task", help="task name; * matches any characters (e.g. 'shop.tasks.*')")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="AGE",
        help="staged at least this long ago: 90s, 15m, 3h, 7d",
    )
    if keys:
        p.add_argument("ids", nargs="*", metavar="ID", help="outbox row ids or Celery task ids")


def add_change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="count the rows it would change, change none")
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH,
        help=f"row ids per statement and transaction (default {DEFAULT_BATCH})",
    )


def add_jobs_arguments(
    jobs: argparse.ArgumentParser, db_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The ``jobs`` subcommands on ``jobs`` (shared by ``reliable-job`` and ``manage.py``)."""
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list outbox rows (by id)")
    add_filter_options(p)
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIST_LIMIT,
        help=f"at most this many rows (default {DEFAULT_LIST_LIMIT}; 0: all)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array")
    db_options(p)

    p = sub.add_parser("show", help="one job: task, routing, decoded arguments, headers, errors")
    p.add_argument("id", metavar="ID", help="outbox row id or Celery task id")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    db_options(p)

    p = sub.add_parser("retry-dead", help="put dead rows back to pending")
    add_filter_options(p, states=False, keys=True)
    add_change_options(p)
    db_options(p)

    p = sub.add_parser("purge", help="delete rows (dead ones; pending or sent only with --force)")
    add_filter_options(p, keys=True)
    add_change_options(p)
    p.add_argument("--force", action="store_true", help="allow purging pending and sent rows")
    db_options(p)

    p = sub.add_parser("publish-now", help="pending rows waiting on a publish backoff: due now")
    add_filter_options(p, states=False, keys=True)
    add_change_options(p)
    db_options(p)


def add_jobs_commands(subparsers: Any, db_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``jobs ...`` on the ``reliable-job`` parser, and ``retry-dead`` as an alias of
    ``jobs retry-dead`` (same filters; with none, every dead row, as it always did)."""
    jobs = subparsers.add_parser("jobs", help="list, show, retry, purge and publish jobs")
    add_jobs_arguments(jobs, db_options)
    jobs.set_defaults(func=cmd_jobs)
    retry = subparsers.choices.get("retry-dead")
    if retry is None:
        retry = subparsers.add_parser("retry-dead", help="put dead rows back to pending")
        db_options(retry)
    add_filter_options(retry, states=False, keys=True)
    add_change_options(retry)
    retry.set_defaults(func=cmd_jobs, jobs_command="retry-dead")


def cmd_jobs(args: argparse.Namespace) -> int:
    """The ``reliable-job jobs`` entry point: the outbox of ``-A``'s app, or of the options."""
    from reliable_job.cli import database_of

    database = database_of(args)
    try:
        return run_jobs(args, database, sys.stdout, sys.stderr)
    finally:
        database.close()


# -- the commands ------------------------------------------------------------------------------


def job_filter(args: argparse.Namespace, *, states: tuple[str, ...] = (), waiting: bool = False) -> JobFilter:
    """The rows the options select."""
    keys = [str(k) for k in getattr(args, "ids", None) or []]
    older = getattr(args, "older_than", None)
    return JobFilter(
        states=tuple(dict.fromkeys(getattr(args, "state", None) or ())) or states,
        task=args.task or None,
        created_before=None if older is None else datetime.now(timezone.utc) - timedelta(seconds=older),
        ids=tuple(int(k) for k in keys if k.isdigit() and len(k) < 19),
        job_ids=tuple(keys),
        waiting=waiting,
    )


def run_jobs(args: argparse.Namespace, admin: OutboxAdmin, out: _Stream, err: _Stream) -> int:
    """Run the ``jobs`` subcommand ``args.jobs_command`` on ``admin``; the exit status."""
    command = args.jobs_command
    if command == "list":
        return list_jobs(args, admin, out)
    if command == "show":
        return show_job(args, admin, out, err)
    if command == "retry-dead":
        where = job_filter(args, states=(schema.DEAD,))
        return change(args, admin, JobAction.RETRY_DEAD, where, out, err, "dead job(s) back to pending")
    if command == "purge":
        where = job_filter(args, states=(schema.DEAD,))
        live = [s for s in where.states if s != schema.DEAD]
        if live and not args.force:
            raise ReliableJobError(
                f"refusing to purge {'/'.join(live)} rows: pending rows are jobs not published yet and "
                "sent rows jobs not completed yet; deleting them loses those jobs (add --force if "
                "that is what you mean)"
            )
        return change(args, admin, JobAction.PURGE, where, out, err, "job(s) purged")
    if command == "publish-now":
        where = job_filter(args, waiting=True)
        return change(args, admin, JobAction.PUBLISH_NOW, where, out, err, "waiting job(s) due now")
    raise ReliableJobError(f"unknown jobs command {command!r}")  # pragma: no cover - argparse


def change(
    args: argparse.Namespace,
    admin: OutboxAdmin,
    action: str,
    where: JobFilter,
    out: _Stream,
    err: _Stream,
    what: str,
) -> int:
    """Count (``--dry-run``) or change the rows, in batches, with progress on a terminal."""
    if args.dry_run:
        print(f"dry run: {admin.count_jobs(where)} {what} (nothing changed)", file=out)
        return 0
    progress = Progress(err, admin.count_jobs(where) if _isatty(err) else None, action)
    count = admin.change_jobs(action, where, batch_size=args.batch_size, progress=progress)
    progress.done()
    print(f"{count} {what}", file=out)
    return 0


def _isatty(stream: _Stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


class Progress:
    """Progress of a long change on a terminal: ``\\r<action>: 3000/12000 rows`` on ``stream``
    after each batch, only when ``stream`` is a terminal (nothing in logs or pipes)."""

    def __init__(self, stream: _Stream, total: int | None, action: str) -> None:
        self.stream = stream
        self.total = total
        self.action = action
        self.shown = _isatty(stream)
        self.written = False

    def __call__(self, count: int) -> None:
        if not self.shown:
            return
        of = f"/{self.total}" if self.total is not None else ""
        self.stream.write(f"\r{self.action}: {count}{of} rows")
        self.stream.flush()
        self.written = True

    def done(self) -> None:
        if self.written:
            self.stream.write("\n")
            self.stream.flush()


def list_jobs(args: argparse.Namespace, admin: OutboxAdmin, out: _Stream) -> int:
    limit = args.limit if args.limit and args.limit > 0 else None
    rows = admin.find_jobs(job_filter(args), limit=limit)
    if args.json:
        print(json.dumps([row_dict(r) for r in rows], ensure_ascii=False), file=out)
        return 0
    now = datetime.now(timezone.utc)
    several = any(r.database for r in rows)
    header = ["id", *(["database"] if several else []), "state", "task", "queue", "age", "attempts", "error"]
    table = [header]
    for r in rows:
        error = (r.last_error or "").replace("\n", " ")
        table.append(
            [
                str(r.id),
                *([r.database] if several else []),
                r.state,
                r.task_name,
                r.queue,
                age(r.created_at, now),
                str(r.attempts),
                error if len(error) <= 60 else error[:59] + "\u2026",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip(), file=out)
    more = f" (the first {limit}; --limit 0 for all)" if limit is not None and len(rows) == limit else ""
    print(f"{len(rows)} job(s){more}", file=out)
    return 0


def show_job(args: argparse.Namespace, admin: OutboxAdmin, out: _Stream, err: _Stream) -> int:
    rows = admin.get_jobs(str(args.id))
    if not rows:
        print(f"no job with row id or task id {args.id!r}", file=err)
        return 1
    views = [(row, describe(row.message or "")) for row in rows]
    if args.json:
        docs = [dict(row_dict(row), message=view) for row, view in views]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, ensure_ascii=False, default=str), file=out)
        return 0
    for n, (row, view) in enumerate(views):
        if n:
            print("", file=out)
        print(format_job(row, view), file=out)
    return 0


def describe(message: str) -> dict[str, Any]:
    """The stored message decoded for display, by the Celery adapter (JSON bodies decoded, any
    other serializer opaque, never deserialized)."""
    try:
        from reliable_job.integrations.celery.display import describe_message
    except ImportError as exc:  # a base install without the celery extra
        return {"error": f"cannot decode the message: {exc} (pip install 'reliable-job[celery]')"}
    return describe_message(message).as_dict()


def row_dict(row: JobRow) -> dict[str, Any]:
    """A row as JSON values (times ISO 8601 UTC; no message)."""
    doc = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(row).items()}
    doc.pop("message", None)
    if not row.database:
        doc.pop("database", None)
    return doc


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=False)


def format_job(row: JobRow, view: Mapping[str, Any]) -> str:
    """``jobs show``'s human output: one ``name: value`` line each."""
    now = datetime.now(timezone.utc)

    def at(value: datetime | None) -> str:
        if value is None:
            return "-"
        return (
            f"{value.isoformat(sep=' ', timespec='seconds')} ({age(value, now)} ago)"
            if value <= now
            else (f"{value.isoformat(sep=' ', timespec='seconds')} (in {age(now, value)})")
        )

    headers = view.get("headers") or {}
    lines = [
        ("row id", str(row.id) + (f" (database {row.database})" if row.database else "")),
        ("task id", row.job_id),
        ("task", row.task_name),
        ("state", row.state),
        ("queue", row.queue),
        ("exchange / routing key", f"{view.get('exchange')!r} / {view.get('routing_key')!r}"),
        ("publish attempts", str(row.attempts)),
        ("celery retries", str(headers.get("retries", "-"))),
        ("last error", row.last_error or "-"),
        ("created", at(row.created_at)),
        ("eta", at(row.eta)),
        ("due to publish", at(row.available_at) if row.state == schema.PENDING else "-"),
        ("sent", at(row.sent_at)),
        ("updated", at(row.updated_at)),
        (
            "body",
            f"{view.get('content_type')}, {view.get('content_encoding')}, {view.get('body_size')} bytes",
        ),
    ]
    if view.get("error"):
        lines.append(("message", f"not readable: {view['error']}"))
    if view.get("body_note"):
        lines.append(("arguments", str(view["body_note"])))
    else:
        lines.append(("args", _json(view.get("args"))))
        lines.append(("kwargs", _json(view.get("kwargs"))))
        if view.get("embed"):
            lines.append(("callbacks (embed)", _json(view["embed"])))
    lines.append(("headers", _json(headers)))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in lines)


def age(since: datetime | None, now: datetime | None = None) -> str:
    """A short age: ``42s``, ``17m``, ``5h``, ``3d``."""
    if since is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
