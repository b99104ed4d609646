"""``celery -A proj reliable-job <command>``: the ``reliable-job`` command inside Celery's own
command line (entry point group ``celery.commands``, as Flower adds ``celery flower``).

Importing this module (Celery's command line does, at start) also registers ``celery inspect
reliable_job_status``. Celery has resolved ``-A`` already (and its other global options:
``--config``, ``--broker``...); the arguments after ``reliable-job`` go to
:func:`reliable_job.cli.main` unchanged, with that app.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

# Loaded by Celery's command line at start (the entry point): this registers the remote-control
# command ``celery inspect reliable_job_status`` in the client too, which a Django project's
# ``celery -A proj inspect`` would otherwise not know (it never imports reliable-job itself).
importlib.import_module("reliable_job.integrations.celery.visibility")


@click.command(
    name="reliable-job",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def reliable_job(ctx: click.Context, args: tuple[str, ...]) -> None:
    """reliable-job's commands (relay, status, check, retry-dead, init-db...) on this app."""
    from reliable_job.cli import main

    obj: Any = ctx.obj
    app = getattr(obj, "app", None) if obj is not None else None
    code = main(list(args) or ["--help"], app=app)
    sys.exit(code)
