"""How fast ``fleet batch run`` puts a file of runs into the backlog, from one client.

Starts its own Redis (no workers: nothing is dispatched, so what is measured is submission
alone), writes N input lines, runs the real command and reads the backlog size in Redis
until every line is queued; then stops the command (it would wait for results) and prints a
table. ``python ops/bench/batch_submit.py --lines 20000 --out ops/bench/results/batch-submit.md``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops" / "bench"))

from common import provenance  # noqa: E402

from fleet.connections import redis_client  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="batch-submit-"))
    procs = launch.Processes(root / "logs")
    try:
        url = launch.start_redis(procs, root / "redis")
        env = {**os.environ, "FLEET_REDIS_URL": url, "FLEET_KEY_PREFIX": "bs", "FLEET_QUEUE_PREFIX": "bs."}
        settings = Settings(_env_file=None, redis_url=url, key_prefix="bs", queue_prefix="bs.")
        src = root / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "input": {"topic": f"document {i}: " + "x" * 100}}) + "\n"
                               for i in range(args.lines)))
        r = redis_client(settings)
        cmd = [sys.executable, "-m", "fleet.surfaces.cli", "batch", "run", str(src), "--agent", "writer",
               "--out", str(root / "out.jsonl"), "--json"]
        t0 = time.perf_counter()
        job = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while int(r.get(settings.keys.backlog_size) or 0) < args.lines:
            if job.poll() is not None:
                raise SystemExit(f"fleet batch run exited early: {job.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=60)
        queued = int(r.get(settings.keys.backlog_size) or 0)
        used = int(r.info("memory")["used_memory"])
    finally:
        procs.stop()
    rows = [("lines in the file", f"{args.lines:,}"), ("runs queued in the backlog", f"{queued:,}"),
            ("command start to the last run queued (process start included)", f"{elapsed:.2f} s"),
            ("submit rate, one client", f"{queued / elapsed:,.0f} runs/s"),
            ("Redis used memory with them queued", f"{used / 2**20:.1f} MiB ({used / queued:,.0f} B per run)")]
    text = "\n".join(["| measure | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])
    print(text)
    if args.out:
        header = ["# Batch submission: one client filling the backlog", "", *provenance(time.time() - started), ""]
        args.out.write_text("\n".join([*header, text, ""]))


if __name__ == "__main__":
    main()
