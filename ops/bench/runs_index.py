"""What the runs index costs and how fast listings are over many runs.

Starts its own Redis, makes N runs through the run store's own writes (the transaction that
creates a run, the script that ends it), spread over tenants, agents, classes, endings and the
last 24 hours, then reads the index's bytes (``MEMORY USAGE`` of its keys) and times listings
and short-id lookups on it. Prints a table and writes it with the commit and the command.

``python ops/bench/runs_index.py --runs 100000 --out ops/bench/results/runs-index.md``
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops" / "bench"))

from common import provenance  # noqa: E402

from fleet.connections import redis_client  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.run.records import RunRecord, new_run_id  # noqa: E402
from fleet.run.store import RunStore  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

TENANTS = ("search", "reports", "support")
AGENTS = ("calculator", "writer", "solver", "chat")
ENDINGS = (("succeeded", 0.90), ("failed", 0.04), ("dead_lettered", 0.03), ("cancelled", 0.02), ("expired", 0.01))
ERRORS = {"failed": "TransientError: Triton timed out after 30s", "dead_lettered": "PermanentError: tool input invalid",
          "cancelled": "RunCancelled: cancelled by request", "expired": "DeadlineExceeded: deadline passed"}


def _make(store: RunStore, n: int, now: float, endings: tuple[tuple[str, float], ...], seed: int = 1) -> None:
    rnd = random.Random(seed)
    names, weights = zip(*endings)
    for i in range(n):
        created = now - 86400 * (n - i) / n
        record = RunRecord(id=new_run_id(), agent=rnd.choice(AGENTS), priority=rnd.choice(("interactive", "batch")),
                           tenant=rnd.choice(TENANTS), status="queued", created_at=created,
                           deadline_at=created + 3600, input={"question": "What is 6 * 7?"})
        store.create(record)
        status = rnd.choices(names, weights)[0]
        if status == "succeeded":
            store.end(record.id, "succeeded", result="The answer is 42.")
        else:
            kind, _, message = ERRORS[status].partition(": ")
            store.end(record.id, status, error={"type": kind, "message": message})  # type: ignore[arg-type]


def _index_bytes(store: RunStore) -> int:
    r = store.redis
    return sum(r.memory_usage(k, samples=0) or 0 for k in r.scan_iter(f"{store.keys.runs_index_base}*"))


def _timed(call: Callable[[], object], repeat: int = 15) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, out


def _bytes_per_run(url: str, n: int, endings: tuple[tuple[str, float], ...], prefix: str) -> float:
    settings = Settings(_env_file=None, redis_url=url, key_prefix=prefix, queue_prefix=f"{prefix}.")
    store = RunStore(settings, redis_client(settings))
    _make(store, n, time.time(), endings, seed=2)
    return _index_bytes(store) / n


def _listings(client: FleetClient, now: float) -> list[tuple[str, float, int, int]]:
    queries = [
        ("newest 50 runs, every tenant (operator)", {}),
        ("tenant search: interactive runs that failed in the last hour",
         {"tenant": "search", "priority": "interactive", "status": ["failed", "dead_lettered"], "since": now - 3600}),
        ("tenant reports: 50 newest succeeded runs of agent writer", {"tenant": "reports", "agent": "writer",
                                                                     "status": "succeeded"}),
        ("error text 'timed out', last 24 h (every tenant)", {"error": "timed out", "since": now - 86400}),
        ("tenant support: batch runs created 12 to 11 hours ago", {"tenant": "support", "priority": "batch",
                                                                   "since": now - 43200, "until": now - 39600}),
    ]
    rows = []
    for label, q in queries:
        ms, page = _timed(lambda q=q: client.runs(limit=50, **q))
        rows.append((label, ms, len(page.runs), page.scanned))  # type: ignore[attr-defined]
    cursor, pages, t0 = None, 0, time.perf_counter()
    for _ in range(100):
        page = client.runs(limit=50, cursor=cursor)
        pages, cursor = pages + 1, page.next_cursor
        if cursor is None:
            break
    rows.append((f"one page of 50 after another, {pages} pages deep (per page)",
                 (time.perf_counter() - t0) * 1000 / pages, 50, 50))
    some = client.runs(limit=20).runs
    ms, _ = _timed(lambda: [client.resolve(r.id[:8]) for r in some], repeat=5)
    rows.append(("a short id (8 hex digits) resolved (per id)", ms / len(some), 1, 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=10_000, help="Runs of one ending, for its bytes per run.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="runs-index-"))
    procs = launch.Processes(root / "logs")
    started = time.time()
    try:
        url = launch.start_redis(procs, root / "redis")
        settings = Settings(_env_file=None, redis_url=url, key_prefix="ri", queue_prefix="ri.")
        client = FleetClient(settings, admin=True)
        now = time.time()
        _make(client.store, args.runs, now, ENDINGS)
        total = _index_bytes(client.store)
        listed = _listings(client, time.time())
        succeeded = _bytes_per_run(url, args.sample, (("succeeded", 1.0),), "ok")
        failed = _bytes_per_run(url, args.sample, (("failed", 1.0),), "ko")
        client.close()
    finally:
        procs.stop()
    mix = ", ".join(f"{name} {share:.0%}" for name, share in ENDINGS)
    lines = [f"# Runs index: bytes per run and listings over {args.runs:,} runs", "",
             *provenance(time.time() - started),
             f"Runs: {len(TENANTS)} tenants, {len(AGENTS)} agents, both classes, created over the last 24 h; "
             f"endings {mix}.", "",
             "| index bytes per run | result |", "|---|---|",
             f"| this mix ({args.runs:,} runs) | {total / args.runs:,.0f} B ({total / 2**20:.1f} MiB) |",
             f"| a succeeded run ({args.sample:,} runs: its set by tenant, class and agent, and ids) "
             f"| {succeeded:,.0f} B |",
             f"| a run that ended otherwise ({args.sample:,} failed runs: its status set too) | {failed:,.0f} B |",
             "", "| listing (median of 15, ms) | ms | runs | entries examined |", "|---|---|---|---|",
             *(f"| {label} | {ms:.1f} | {n} | {scanned:,} |" for label, ms, n, scanned in listed)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
