"""The operator's documents name what the code has: every setting is in the README's table, every
metric the Prometheus adapter exposes is in docs/operating/metrics.md, every CLI command in the
README's command table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from reliable_job.cli import build_parser
from reliable_job.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", README, flags=re.MULTILINE))
    missing = {field.name for field in dataclasses.fields(Settings)} - listed
    assert not missing, f"settings missing from the README's Configuration table: {sorted(missing)}"


def test_every_metric_is_documented():
    from reliable_job.integrations.prometheus.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    names = {metric.name for metric in registry.collect()}
    names |= {"reliable_job_outbox_rows", "reliable_job_oldest_pending_seconds"}
    names |= {"reliable_job_oldest_sent_seconds", "reliable_job_outbox_up"}
    doc = (ROOT / "docs" / "operating" / "metrics.md").read_text()
    undocumented = {name for name in names if name not in doc}
    assert not undocumented, f"metrics missing from docs/operating/metrics.md: {sorted(undocumented)}"


def test_every_command_is_in_the_readme():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    mentioned = set(re.findall(r"`reliable-job (?:-A proj )?([a-z-]+)", README))
    missing = set(commands) - mentioned
    assert not missing, f"commands the README does not mention: {sorted(missing)}"
