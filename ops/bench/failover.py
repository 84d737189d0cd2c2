"""Benchmark: Redis losing its primary under a steady load (Sentinel failover).

Starts its own Redis topology (a primary, two replicas, three Sentinels: real ``redis-server``
processes, ``fleet.ops.redis_ha``), a Triton serving the dev model and real Celery worker
processes with the fleet's production delivery settings (visibility timeout, stall time,
reconciler interval: the defaults), and measures, in one run:

- **the cost of the replica wait**: a step commit's latency (``RunStore.finish_step``: the Lua
  commit with its event, one round trip) with the wait for a replica and without, in
  alternating blocks against the same primary; and the barrier a worker adds after publishing
  a step's next message;
- **failovers under load**: interactive and batch runs at steady rates; the primary is killed
  (``kill -9``) ``--kills`` times while runs of both classes are in flight, the killed server
  coming back as a replica between kills. Per kill: when the Sentinels promoted a replica,
  when a step in flight committed, when the fleet served new work again (a model step and a
  tool step of runs accepted after the kill, committed: both kinds of worker consuming from
  the promoted replica); all times from the kill, the Sentinels' detection included;
- **what it cost the runs**: runs accepted, completed, lost (accepted and never finished, or
  gone), steps committed twice (a step's ``done`` events, which its commit writes once), steps
  run twice, interactive runs that missed their deadline, interactive latency of the runs in
  flight around a kill beside the others, submissions retried.

    python ops/bench/failover.py --kills 3 --out ops/bench/results/failover.md

The load and the census of commits are the failover test's (``tests/support/failover.py``), so
the benchmark counts what the test asserts on, the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops" / "bench"))

from common import provenance  # noqa: E402

from fleet.broker.queues import worker_queues  # noqa: E402
from fleet.ops import launch, redis_ha  # noqa: E402
from fleet.run.records import TERMINAL, RunRecord, StepRecord, new_run_id  # noqa: E402
from fleet.run.store import RunStore  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402
from tests.support.failover import SteadyLoad, commit_census, status_counts  # noqa: E402

#: The dev model's timing: a fast medium model (the scheduling benchmark's).
TIMING = {"ttft_ms": 100, "prefill_ms_per_token": 0.1, "tpot_ms": 10, "load_factor": 0.02}
WORKERS = {"inference-interactive": ("llm", ("interactive",), "threads", 4),
           "inference-shared": ("llm", ("interactive", "batch"), "threads", 8),
           "tools": ("tool", ("interactive", "batch"), "prefork", 2)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def env_of(topology: redis_ha.RedisHA, ep: launch.TritonEndpoints, prefix: str) -> dict[str, str]:
    return {**topology.env(), "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
            "FLEET_TRITON_GRPC_URL": ep.grpc_url, "FLEET_TRITON_HTTP_URL": ep.http_url,
            "FLEET_TRITON_METRICS_URL": ep.metrics_url, "FLEET_LOG_LEVEL": "WARNING",
            "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}


def settings_of(env: dict[str, str], **overrides: object) -> Settings:
    values = {k.removeprefix("FLEET_").lower(): v for k, v in env.items() if k.startswith("FLEET_")}
    return Settings(_env_file=None, **{**values, **overrides})


# --- the cost of the wait -------------------------------------------------------------------

def commit_cost(env: dict[str, str], commits: int, block: int = 100) -> dict[str, dict[str, float]]:
    """A step commit's latency with and without the replica wait, and the worker's barrier after
    a publish, in alternating blocks of ``block`` (ms)."""
    stores = {"without the wait": RunStore(settings_of(env, redis_wait_replicas=0)),
              "with the wait (1 replica)": RunStore(settings_of(env, redis_wait_replicas=1))}
    now = time.time()
    runs = {}
    for label, store in stores.items():
        run = RunRecord(id=new_run_id(), agent="calculator", priority="batch", status="running", created_at=now,
                        deadline_at=now + 3600, input={"question": "cost"})
        store.create(run)
        runs[label] = run.id
    took: dict[str, list[float]] = {label: [] for label in stores}
    barrier: list[float] = []
    waiting = stores["with the wait (1 replica)"]
    for start in range(0, commits, block):
        for label, store in stores.items():
            for i in range(start, start + block):
                step = StepRecord(key=f"s{i}", name="s", iteration=0, status="running", started_at=time.time())
                t0 = time.perf_counter()
                store.finish_step(runs[label], step, {"text": "an output of a few words"})
                took[label].append((time.perf_counter() - t0) * 1000)
        for _ in range(block):
            t0 = time.perf_counter()
            waiting.replicated("barrier", waiting.epoch())
            barrier.append((time.perf_counter() - t0) * 1000)
    out = {label: {"p50": statistics.median(v), "p99": pct(v, 0.99), "n": len(v)} for label, v in took.items()}
    out["barrier"] = {"p50": statistics.median(barrier), "p99": pct(barrier, 0.99), "n": len(barrier)}
    return out


# --- failovers under load -------------------------------------------------------------------

def _unfinished(client: FleetClient, load: SteadyLoad) -> dict[str, int]:
    out = {}
    for priority in ("interactive", "batch"):
        ids = load.ids(priority)[-300:]
        out[priority] = sum(s not in TERMINAL for s in client.store.statuses(ids)) if ids else 0
    return out


def _poll(read, timeout_s: float, interval_s: float = 0.05):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = read()
        if value:
            return value
        time.sleep(interval_s)  # nothing announces it: read again shortly
    return None


def one_kill(client: FleetClient, topology: redis_ha.RedisHA, load: SteadyLoad) -> dict[str, float]:
    in_flight = _poll(lambda: (lambda u: u if min(u.values()) > 0 else None)(_unfinished(client, load)), 60)
    before = topology.primary()
    killed = topology.kill_primary()
    killed_at = time.time()  # the primary is gone (reaped): whatever commits now commits elsewhere
    promoted = _poll(lambda: (lambda p: time.time() if p.port != before.port else None)(_safe_primary(topology)),
                     60, 0.02)
    first = _poll(lambda: commit_census(client, load.ids()).first_after(killed_at), 60, 0.1)

    def resumed() -> float | None:
        census = commit_census(client, load.accepted_after(killed_at))
        llm, tool = census.first_after(killed_at, {"plan"}), census.first_after(killed_at, {"act"})
        return None if llm is None or tool is None else max(llm, tool)

    back = _poll(resumed, 60, 0.1)
    topology.restart(killed)
    topology.wait_whole(60)
    inf = float("inf")
    return {"killed_at": killed_at, "interactive": (in_flight or {}).get("interactive", 0),
            "batch": (in_flight or {}).get("batch", 0), "promoted_s": (promoted or inf) - killed_at,
            "first_commit_s": (first or inf) - killed_at, "resumed_s": (back or inf) - killed_at}


def _safe_primary(topology: redis_ha.RedisHA) -> redis_ha.RedisNode | None:
    try:
        return topology.primary()
    except Exception:  # noqa: BLE001 - the Sentinels know no primary for a moment
        return None


def failovers(env: dict[str, str], procs: launch.Processes, topology: redis_ha.RedisHA, args) -> dict:  # noqa: ANN001
    settings = settings_of(env)
    for name, (kind, classes, pool, threads) in WORKERS.items():
        launch.start_worker(procs, name, worker_queues(settings, kind, classes), pool, threads, env,  # type: ignore[arg-type]
                            node=f"{name}-{uuid.uuid4().hex[:6]}@bench", loglevel="WARNING")
    client = FleetClient(settings, admin=True)
    launch.wait_until(lambda: len(client.app.control.ping(timeout=0.5)) >= len(WORKERS), 60, "workers")
    load = SteadyLoad(client, interactive_per_s=args.interactive_rate, batch_per_s=args.batch_rate).start()
    kills = []
    try:
        time.sleep(args.settle)  # a steady state before the first kill
        for k in range(args.kills):
            print(f"kill {k + 1} of {args.kills} ...", file=sys.stderr)
            kills.append(one_kill(client, topology, load))
            time.sleep(args.settle)
    finally:
        load.stop()
    ids = load.ids()
    finished = _poll(lambda: all(s in TERMINAL for s in client.store.statuses(ids)), args.drain) is not None
    statuses = client.store.statuses(ids)
    census = commit_census(client, ids)
    records = {r: client.get(r) for r, s in zip(ids, statuses) if s is not None}
    windows = [(k["killed_at"], k["killed_at"] + k["resumed_s"]) for k in kills]
    near, far = [], []
    for a in load.accepted:
        run = records.get(a.run_id)
        if a.priority != "interactive" or run is None or run.latency_s is None:
            continue
        end = run.created_at + run.latency_s
        (near if any(run.created_at <= hi and end >= lo for lo, hi in windows) else far).append(run.latency_s)
    expired = status_counts(client, load.ids("interactive"))["expired"]
    client.close()
    return {"kills": kills, "accepted": len(ids), "interactive": len(load.ids("interactive")),
            "batch": len(load.ids("batch")), "finished": finished,
            "completed": statuses.count("succeeded"), "dead_lettered": statuses.count("dead_lettered"),
            "lost": sum(s is None or s not in TERMINAL for s in statuses),
            "expired": expired,
            "twice": census.duplicates(), "commits": census.total(),
            "steps": sum(len(r.steps) for r in records.values()),
            "ran_twice": sum(s.attempts > 1 for r in records.values() for s in r.steps),
            "near": near, "far": far, "retried": load.retried, "refused": load.refused}


# --- the report -----------------------------------------------------------------------------

def render(args, cost: dict, run: dict, down_after_ms: int, elapsed: float, load: tuple[float, float]) -> str:  # noqa: ANN001
    command = (f"python ops/bench/failover.py --kills {args.kills} --interactive-rate {args.interactive_rate:g} "
               f"--batch-rate {args.batch_rate:g} --commits {args.commits} --settle {args.settle:g}"
               + (f" --out {args.out}" if args.out else ""))
    without, with_ = cost["without the wait"], cost["with the wait (1 replica)"]
    kills = run["kills"]
    lines = [
        "# Failover benchmark: Redis losing its primary under load", "",
        *provenance(elapsed, command),
        f"Redis {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}.  ",
        f"Redis: a primary, two replicas, three Sentinels (quorum 2, down-after-milliseconds {down_after_ms}), all "
        "on this machine. Fleet: production delivery settings (visibility timeout, stall time, reconciler "
        f"interval at their defaults); workers {', '.join(f'{n} ({t} {p})' for n, (_, _, p, t) in WORKERS.items())}; "
        f"the dev model at ttft {TIMING['ttft_ms']} ms, {TIMING['tpot_ms']} ms/token.", "",
        "## The cost of the replica wait", "",
        f"A step commit (`RunStore.finish_step`: the commit's Lua call and its barrier, one round trip), "
        f"{args.commits} commits each way in alternating blocks of 100 against the same primary:", "",
        "| | p50 ms | p99 ms | commits |", "|---|---|---|---|",
        f"| without the wait | {without['p50']:.3f} | {without['p99']:.3f} | {without['n']} |",
        f"| with the wait (1 replica) | {with_['p50']:.3f} | {with_['p99']:.3f} | {with_['n']} |",
        f"| **added by the wait** | **{with_['p50'] - without['p50']:.3f}** | {with_['p99'] - without['p99']:.3f} | |",
        "",
        f"Target: the wait adds at most 1 ms to the commit's p50: "
        f"{'met' if with_['p50'] - without['p50'] <= 1.0 else 'NOT met'}. A worker also waits once after publishing "
        f"a step's next message (its own round trip): p50 {cost['barrier']['p50']:.3f} ms, "
        f"p99 {cost['barrier']['p99']:.3f} ms.", "",
        "## Failovers under load", "",
        f"Interactive runs (calculator: model, tool, model) at {args.interactive_rate:g}/s and batch runs (writer: "
        f"three model steps) at {args.batch_rate:g}/s; the primary killed with `kill -9` {args.kills} times, "
        f"{args.settle:g} s of steady load around each kill, the killed server started again as a replica between "
        "kills. Times from the kill.", "",
        "| kill | runs in flight (interactive / batch) | Sentinels promoted a replica | a step in flight committed | "
        "new runs' model and tool steps committed |", "|---|---|---|---|---|"]
    for i, k in enumerate(kills, 1):
        lines.append(f"| {i} | {k['interactive']} / {k['batch']} | {k['promoted_s']:.1f} s | {k['first_commit_s']:.1f} s "
                     f"| **{k['resumed_s']:.1f} s** |")
    worst = max(k["resumed_s"] for k in kills)
    near, far = run["near"], run["far"]
    lines += [
        "", f"Target: steps commit again within 10 s of the primary's death: {'met' if worst <= 10 else 'NOT met'} "
        f"(worst {worst:.1f} s).", "",
        "| runs | value | target |", "|---|---|---|",
        f"| accepted (interactive / batch) | {run['accepted']} ({run['interactive']} / {run['batch']}) | |",
        f"| completed | {run['completed']} | all |",
        f"| lost (accepted, never finished or gone) | **{run['lost']}** | 0 |",
        f"| dead-lettered | {run['dead_lettered']} | 0 |",
        f"| steps committed twice (of {run['commits']} commits, {run['steps']} steps) | **{run['twice']}** | 0 |",
        f"| steps run twice (delivered again and not yet committed) | {run['ran_twice']} | |",
        f"| interactive runs that missed their deadline | {run['expired']} | 0 |",
        f"| interactive run p50 / p99, in flight around a kill ({len(near)} runs) | {pct(near, 0.5):.2f} / "
        f"{pct(near, 0.99):.2f} s | |",
        f"| interactive run p50 / p99, the others ({len(far)} runs) | {pct(far, 0.5):.2f} / {pct(far, 0.99):.2f} s | |",
        f"| submissions retried by their caller (same idempotency key) | {run['retried']} | |",
        f"| submissions refused (Overloaded) | {run['refused']} | |", ""]
    if not run["finished"]:
        lines += [f"Not every run had finished {args.drain:g} s after the load stopped: counted as lost above.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=3, help="primaries killed")
    ap.add_argument("--interactive-rate", type=float, default=4.0, help="interactive runs per second")
    ap.add_argument("--batch-rate", type=float, default=2.0, help="batch runs per second")
    ap.add_argument("--commits", type=int, default=2000, help="commits measured with and without the wait")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of steady load before and after each kill")
    ap.add_argument("--drain", type=float, default=180.0, help="seconds the runs get to finish after the load")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-failover-"))
    procs = launch.Processes(root / "logs")
    started, load_at_start = time.time(), os.getloadavg()[0]
    try:
        topology = redis_ha.start_redis_ha(procs, root / "redis")
        repo = launch.sim_repository(root / "models", **TIMING)
        ep = launch.start_triton(procs, root / "triton", ["medium_sim"], repository=repo)
        env = env_of(topology, ep, f"fo{uuid.uuid4().hex[:6]}")
        print("the cost of the wait ...", file=sys.stderr)
        cost = commit_cost(env, args.commits)
        print("failovers under load ...", file=sys.stderr)
        run = failovers(env, procs, topology, args)
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = render(args, cost, run, topology.down_after_ms, time.time() - started, (load_at_start, os.getloadavg()[0]))
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
