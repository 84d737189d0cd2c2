"""What every benchmark report starts with: the command that made it, the commit it ran on, the
machine; and the percentiles the tables use."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def commit() -> str:
    """The commit the benchmark ran on, with ``+changes`` when the code in the tree differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        # Reports written by earlier benchmarks of the same sitting are outputs, not what runs.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!ops/bench/results"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" +changes" if dirty else "")


# Read when the benchmark starts: what it ran is the tree as it was then, not when the report is written.
STARTED_ON = commit()
LOAD_AT_START = os.getloadavg()[0]


def command_line() -> str:
    """The command as it was typed, relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def provenance(elapsed_s: float, command: str | None = None) -> list[str]:
    """Lines naming the command, the commit and the machine of a report."""
    return [f"Command: `{command or command_line()}`  ",
            f"Commit: `{STARTED_ON}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"took {elapsed_s / 60:.1f} min; 1-minute load average {LOAD_AT_START:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.  "]


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank), NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]
