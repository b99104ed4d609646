"""The child-process toolkit the demo, the tests and the bench share (reliable_job.processes)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from reliable_job.processes import Process, ProcessExited, free_port, wait_for

FORKS_A_STUBBORN_CHILD = """
import os, signal, sys, time
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(300)
print("ready.", flush=True)
time.sleep(300)
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def gone(pid: int) -> bool:
    """The process is no more, or only a zombie waiting for init."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_stop_leaves_nothing_of_the_group_behind(tmp_path):
    """SIGTERM ends the process; what it forked (and which ignores SIGTERM) is killed with it."""
    pid_file = tmp_path / "child.pid"
    with Process(python(FORKS_A_STUBBORN_CHILD, str(pid_file)), tmp_path / "p.log") as proc:
        assert proc.wait_for_line(r"^ready\.$", timeout=30).group(0) == "ready."
        child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30))
        assert proc.stop() == -signal.SIGTERM
    assert proc.poll() == -signal.SIGTERM and proc.peak_rss_mib
    wait_for(lambda: gone(child), timeout=10, message="the forked child killed")


def test_waiting_for_a_process_that_exits_reports_its_log(tmp_path):
    proc = Process(python("print('no broker'); raise SystemExit(3)"), tmp_path / "w.log", name="worker")
    with pytest.raises(ProcessExited, match=r"worker exited with status 3(.|\n)*no broker"):
        proc.wait_for_line("ready", timeout=30)


def test_a_timeout_reports_the_log_and_close_kills(tmp_path):
    with Process(
        python("print('starting', flush=True); import time; time.sleep(300)"), tmp_path / "s.log"
    ) as proc:
        with pytest.raises(TimeoutError, match=r"(.|\n)*starting"):
            proc.wait_for_line("ready", timeout=0.5)
    assert proc.poll() == -signal.SIGKILL


def test_strict_stop_kills_then_raises(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True)"
    code += "; time.sleep(300)"
    proc = Process(python(code), tmp_path / "t.log")
    proc.wait_for_line("up", timeout=30)
    with pytest.raises(TimeoutError, match="SIGTERM"):
        proc.stop(timeout=0.5, strict=True)
    assert proc.poll() == -signal.SIGKILL
    assert proc.stop() == -signal.SIGKILL  # stopping a reaped process is a no-op


def test_wait_for_returns_the_value_or_times_out():
    values = iter([0, None, "", 7])
    assert wait_for(lambda: next(values), timeout=5, interval=0.01) == 7
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, timeout=0.1, interval=0.01, message="the impossible")
    assert 0 < free_port() < 65536


def test_a_hung_process_can_log_its_stacks_before_it_is_killed(tmp_path):
    """``dump_signal``: what the process logs on it is in the error (the tests' processes run
    with ``PYTHONFAULTHANDLER=1``: SIGABRT writes every thread's stack to the log)."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    code += "; print('up', flush=True); time.sleep(300)"
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = Process(python(code), tmp_path / "d.log", env=env)
    proc.wait_for_line("up", timeout=30)
    with pytest.raises(TimeoutError, match=r"(.|\n)*Current thread(.|\n)*<string>"):
        proc.stop(timeout=0.5, strict=True, dump_signal=signal.SIGABRT)
    assert proc.poll() is not None
