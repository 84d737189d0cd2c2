"""Processes started together stop together: every member of each group, not only its leader."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fleet.ops import launch
from tests.support.waiting import wait_until

# A leader that starts a member of its group which ignores SIGTERM (as a Triton python stub
# or a prefork child can outlive its parent), prints the member's pid, and exits on SIGTERM.
LEADER = """
import os, signal, subprocess, sys, time
member = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
    stdout=subprocess.PIPE, text=True)
member.stdout.readline()
print(member.pid, flush=True)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
time.sleep(300)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_waits_for_every_member_of_a_group(tmp_path: Path):
    procs = launch.Processes(tmp_path / "logs")
    proc = procs.start("leader", [sys.executable, "-c", LEADER])
    log_file = tmp_path / "logs" / "leader.log"
    member = wait_until(lambda: int(log_file.read_text().split()[0]) if log_file.read_text().split() else None,
                        30, "the group's member writing its pid")
    assert _running(member)
    assert os.getpgid(member) == proc.pid
    procs.stop(timeout_s=2.0)
    assert proc.returncode == 0  # the leader went on SIGTERM
    assert not _running(member), "a member of the group outlived stop()"
    procs.stop()  # stopping again is a no-op
