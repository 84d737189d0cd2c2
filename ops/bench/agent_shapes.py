"""Benchmark: agents that fan out, wait, and choose their model.

Starts its own Redis, two Triton servers (the medium model's simulator, and the small model's
on a server of its own so that the medium one can be killed) and real Celery worker processes,
and measures, side by side in one run:

- **fan-out**: a run that maps one model call over 8 items (a parallel step) against the
  slowest of those 8 calls run alone as single-step runs, on an idle pool (target: the fan-out
  run within 1.3x of its slowest branch alone);
- **parked runs**: interactive latency of a one-call agent with no run parked, then with
  ``--parked`` runs parked at a wait step (target: the same within noise: parked runs hold no
  worker thread), then every parked run signalled (all must resume and succeed);
- **fallback**: interactive one-call runs at a steady rate while the medium model's Triton is
  killed (SIGKILL) mid-run: runs whose step may fall back to the small model, and runs whose
  step may not. Target: >= 95% of the first meet their deadline; the second are refused or end
  (dead-lettered, expired), never left hanging.

    python ops/bench/agent_shapes.py --out ops/bench/results/agent-shapes.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pct, provenance  # noqa: E402

from fleet.broker.queues import worker_queues  # noqa: E402
from fleet.errors import Overloaded  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.run.records import TERMINAL, RunRecord  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

ITEMS = [f"the {w} of a worker fleet" for w in ("queues", "deadlines", "retries", "dead letters", "priorities",
                                                 "tenants", "replicas", "budgets")]
MAX_TOKENS = 48

AGENTS = {
    "bench_fan8.toml": f'''
name = "bench_fan8"
result = "each"
[inputs.items]
type = "string"
[example]
items = "a; b"
[[steps]]
name = "split"
kind = "tool"
tool = "split"
input = "{{input.items}}"
[[steps]]
name = "each"
kind = "parallel"
over = "split"
max_concurrency = 8
[steps.branch]
name = "summary"
kind = "llm"
prompt = "Summarize in one sentence: {{branch.item}}"
max_tokens = {MAX_TOKENS}
''',
    "bench_one.toml": f'''
name = "bench_one"
result = "summary"
[inputs.item]
type = "string"
[example]
item = "a"
[[steps]]
name = "summary"
kind = "llm"
prompt = "Summarize in one sentence: {{input.item}}"
max_tokens = {MAX_TOKENS}
''',
    "bench_park.toml": '''
name = "bench_park"
result = "after"
[inputs.text]
type = "string"
[example]
text = "a"
[[steps]]
name = "before"
kind = "tool"
tool = "reverse"
input = "{input.text}"
[[steps]]
name = "hold"
kind = "wait"
signal = "go"
timeout_s = 3600
[[steps]]
name = "after"
kind = "tool"
tool = "reverse"
input = "{steps.hold}"
''',
    "bench_fallback.toml": '''
name = "bench_fallback"
result = "answer"
[inputs.item]
type = "string"
[example]
item = "a"
[[steps]]
name = "answer"
kind = "llm"
fallback = "small"
prompt = "Answer briefly: {input.item}"
max_tokens = 24
''',
    "bench_nofallback.toml": '''
name = "bench_nofallback"
result = "answer"
[inputs.item]
type = "string"
[example]
item = "a"
[[steps]]
name = "answer"
kind = "llm"
prompt = "Answer briefly: {input.item}"
max_tokens = 24
''',
}


class Stack:
    """Redis, the two Tritons and the workers of one benchmark run."""

    def __init__(self, root: Path, threads: int) -> None:
        self.root, self.procs = root, launch.Processes(root / "logs")
        agents = root / "agents"
        agents.mkdir(parents=True)
        for name, text in AGENTS.items():
            (agents / name).write_text(text)
        redis_url = launch.start_redis(self.procs, root / "redis")
        medium_repo = launch.sim_repository(root / "medium-models", "medium_sim")
        small_repo = launch.sim_repository(root / "small-models", "small_sim", ttft_ms=60, tpot_ms=8)
        self.medium = launch.start_triton(self.procs, root / "medium", ["medium_sim"], name="medium",
                                          repository=medium_repo)
        self.small = launch.start_triton(self.procs, root / "small", ["small_sim"], name="small",
                                         repository=small_repo)
        models = [{"name": "small_sim", "replicas": [{"name": "small-1", "grpc_url": self.small.grpc_url,
                                                      "metrics_url": self.small.metrics_url}]},
                  {"name": "medium_sim"}]
        prefix = f"b{uuid.uuid4().hex[:6]}"
        self.env = {
            "FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
            "FLEET_TRITON_GRPC_URL": self.medium.grpc_url, "FLEET_TRITON_HTTP_URL": self.medium.http_url,
            "FLEET_TRITON_METRICS_URL": self.medium.metrics_url, "FLEET_AGENTS_DIR": str(agents),
            "FLEET_MODELS": json.dumps(models), "FLEET_MODEL_ROLES": json.dumps({"small": "small_sim"}),
            "FLEET_TRITON_CONNECT_WAIT_S": "2", "FLEET_REPLICA_PROBE_INTERVAL_S": "1",
            "FLEET_RECONCILE_INTERVAL_S": "1",
            "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
        }
        os.environ.update(self.env)
        self.settings = Settings(_env_file=None)
        self.client = FleetClient(self.settings, admin=True)
        self.threads = threads
        nodes = [
            launch.start_worker(self.procs, "inference", worker_queues(self.settings, "llm"), "threads", threads,
                                self.env, loglevel="WARNING"),
            launch.start_worker(self.procs, "tools", worker_queues(self.settings, "tool"), "threads", 8, self.env,
                                loglevel="WARNING"),
        ]
        for node in nodes:
            launch.wait_until(lambda n=node: launch.worker_answers(self.client.app, n), 90, f"worker {node}",
                              None, 0.5)

    def close(self) -> None:
        self.client.close()
        self.procs.stop()


def run_record(client: FleetClient, agent: str, input: dict, deadline_s: float = 60.0) -> RunRecord:
    run = client.wait(client.submit(agent, input, deadline_s=deadline_s), timeout=deadline_s + 30)
    if run.status != "succeeded":
        raise SystemExit(f"{agent} run {run.id} ended {run.status}: {run.error}")
    return run


def run_latency(client: FleetClient, agent: str, input: dict, deadline_s: float = 60.0) -> float:
    return run_record(client, agent, input, deadline_s).latency_s or 0.0


def model_s(run: RunRecord) -> float:
    """The longest model call of a run."""
    return max((s.model_s or 0.0) for s in run.steps)


def fan_out(stack: Stack, reps: int) -> dict:
    """The fan-out run against its slowest branch alone, ``reps`` times each, idle pool."""
    c = stack.client
    run_latency(c, "bench_one", {"item": "warm up"})
    ratios, fans, slowest, fan_model, alone_model = [], [], [], [], []
    for rep in range(reps):
        items = [f"{it} (round {rep})" for it in ITEMS]
        alone = max((run_record(c, "bench_one", {"item": it}) for it in items), key=lambda r: r.latency_s or 0.0)
        fan = run_record(c, "bench_fan8", {"items": "; ".join(items)})
        fans.append(fan.latency_s or 0.0)
        slowest.append(alone.latency_s or 0.0)
        ratios.append(fans[-1] / slowest[-1])
        fan_model.append(model_s(fan))
        alone_model.append(model_s(alone))
    return {"fan_s": fans, "slowest_s": slowest, "ratios": ratios, "fan_model_s": fan_model,
            "alone_model_s": alone_model}


def latencies(client: FleetClient, n: int) -> list[float]:
    return [run_latency(client, "bench_one", {"item": f"interactive {i} {uuid.uuid4().hex[:4]}"}, 30) for i in range(n)]


def parked(stack: Stack, n_parked: int, n_probe: int) -> dict:
    """Interactive latency without and with ``n_parked`` parked runs, then every parked run signalled."""
    c = stack.client
    before = latencies(c, n_probe)
    t0 = time.perf_counter()
    ids = [c.submit("bench_park", {"text": f"parked {i}"}, deadline_s=3600) for i in range(n_parked)]
    submit_s = time.perf_counter() - t0
    deadline = time.monotonic() + 300
    while c.store.parked() < n_parked and time.monotonic() < deadline:
        time.sleep(0.5)
    n_parked_seen = c.store.parked()
    with_parked = latencies(c, n_probe)
    t1 = time.perf_counter()
    outcomes = [c.signal(r, "go", f"resume {i}") for i, r in enumerate(ids)]
    signal_s = time.perf_counter() - t1
    ended = wait_all(c, ids, 300)
    statuses = c.store.statuses(ids)
    return {"before": before, "with": with_parked, "parked": n_parked_seen, "submit_s": submit_s,
            "signal_s": signal_s, "resumed": outcomes.count("resumed"),
            "succeeded": statuses.count("succeeded"), "all_ended_s": ended - t1}


def wait_all(client: FleetClient, ids: list[str], timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    left = list(ids)
    while left and time.monotonic() < deadline:
        statuses = client.store.statuses(left[:1000])
        done = {r for r, s in zip(left[:1000], statuses) if s in TERMINAL}
        left = [r for r in left if r not in done]
        if left:
            time.sleep(0.2)
    return time.perf_counter()


def fallback(stack: Stack, seconds: float, rate: float, deadline_s: float) -> dict:
    """Interactive runs at ``rate``/s for ``seconds`` of each kind; the medium Triton killed at a third."""
    c = stack.client
    submitted: dict[str, list[str]] = {"bench_fallback": [], "bench_nofallback": []}
    refused = {"bench_fallback": 0, "bench_nofallback": 0}
    killed_at: list[float] = []

    def killer() -> None:
        time.sleep(seconds / 3)
        stack.procs.stop("medium", sig=signal.SIGKILL)
        killed_at.append(time.time())

    threading.Thread(target=killer, daemon=True).start()
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end:
        for agent in submitted:
            try:
                submitted[agent].append(c.submit(agent, {"item": f"question {i}"}, deadline_s=deadline_s))
            except Overloaded:
                refused[agent] += 1
        i += 1
        time.sleep(1 / rate)
    grace = time.time() + deadline_s + 30
    everything = submitted["bench_fallback"] + submitted["bench_nofallback"]
    while time.time() < grace and any(s not in TERMINAL for s in c.store.statuses(everything)):
        time.sleep(0.5)
    out: dict = {"killed_at": killed_at[0] if killed_at else None, "deadline_s": deadline_s}
    for agent, ids in submitted.items():
        runs = [r for r in c.store.get_many(ids) if r is not None]
        after = [r for r in runs if killed_at and r.created_at >= killed_at[0] - 2 * deadline_s]
        met = [r for r in runs if r.status == "succeeded" and (r.latency_s or 1e9) <= deadline_s]
        by_status: dict[str, int] = {}
        for r in runs:
            by_status[r.status] = by_status.get(r.status, 0) + 1
        out[agent] = {"submitted": len(ids), "refused": refused[agent], "met": len(met), "by_status": by_status,
                      "hanging": sum(r.status not in TERMINAL for r in runs),
                      "on_fallback": sum(any(s.fallback for s in r.steps) for r in runs),
                      "in_window": len(after)}
    return out


def report(fan: dict, park: dict, fb: dict, elapsed_s: float, threads: int) -> str:
    ratio = pct(fan["ratios"], 50)
    p50b, p99b = pct(park["before"], 50), pct(park["before"], 99)
    p50w, p99w = pct(park["with"], 50), pct(park["with"], 99)
    f, n = fb["bench_fallback"], fb["bench_nofallback"]
    met = f["met"] / max(1, f["submitted"])
    lines = [
        "# Agent shapes: fan-out, parked runs, model fallback", "",
        *provenance(elapsed_s), "",
        f"Pool: the medium model's simulator (triton_models/medium_sim defaults: ttft 150 ms, 25 ms per token, "
        f"load factor 0.02) on one Triton, the small model's (ttft 60 ms, 8 ms per token) on another; one "
        f"inference worker of {threads} threads, one tool worker of 8; model calls of {MAX_TOKENS} tokens.", "",
        "| figure | measured | target |", "|---|---|---|",
        f"| fan-out of 8 model calls / slowest branch alone (median of {len(fan['ratios'])}) | "
        f"{ratio:.2f}x | <= 1.3x |",
        f"| interactive p50 with {park['parked']} runs parked / without | {p50w / p50b:.2f} | ~1.0 (noise) |",
        f"| interactive p99 with {park['parked']} runs parked / without | {p99w / p99b:.2f} | ~1.0 (noise) |",
        f"| parked runs resumed and succeeded after their signal | {park['succeeded']} of {park['parked']} | all |",
        f"| medium model killed: fallback-allowed runs meeting their {fb['deadline_s']:g} s deadline | "
        f"{met:.1%} ({f['met']} of {f['submitted']}) | >= 95% |",
        f"| medium model killed: runs without fallback left hanging | {n['hanging']} | 0 |", "",
        "## Fan-out", "",
        "| round | fan-out run (s) | its slowest model call (s) | slowest branch alone (s) | its model call (s) "
        "| ratio |", "|---|---|---|---|---|---|",
        *[f"| {i + 1} | {a:.3f} | {fm:.3f} | {b:.3f} | {am:.3f} | {r:.2f} |"
          for i, (a, fm, b, am, r) in enumerate(zip(fan["fan_s"], fan["fan_model_s"], fan["slowest_s"],
                                                    fan["alone_model_s"], fan["ratios"]))], "",
        "The fan-out run is a tool step that splits the list, a parallel step of 8 model branches joined in the "
        "commit script, and the run's end; the single runs are one model step each, run one after another. "
        f"The fleet's own part of the fan-out run (its latency less its slowest model call) is "
        f"{pct([a - m for a, m in zip(fan['fan_s'], fan['fan_model_s'])], 50) * 1000:.0f} ms at the median, "
        f"against {pct([a - m for a, m in zip(fan['slowest_s'], fan['alone_model_s'])], 50) * 1000:.0f} ms for a "
        "single-step run; the rest of the gap is the model's: 8 sequences decoding together make each decode step "
        "slower (the simulator's load factor, as in vLLM's continuous batching), and the 2-core machine runs the "
        "8 streams, the workers and Triton on the same cores.", "",
        "## Parked runs", "",
        f"{park['parked']} runs parked at a wait step (submitted in {park['submit_s']:.1f} s), holding no worker "
        f"thread. Interactive one-call runs, one at a time ({len(park['before'])} each):", "",
        "| | p50 (s) | p99 (s) |", "|---|---|---|",
        f"| no run parked | {p50b:.3f} | {p99b:.3f} |",
        f"| {park['parked']} parked | {p50w:.3f} | {p99w:.3f} |", "",
        f"Signalling all {park['parked']} took {park['signal_s']:.1f} s from one client ({park['resumed']} answered "
        f"'resumed'); all had ended {park['all_ended_s']:.1f} s after the first signal; {park['succeeded']} "
        "succeeded.", "",
        "## Medium model killed mid-run", "",
        "Interactive runs of both kinds submitted side by side at a steady rate; the medium model's Triton "
        "killed (SIGKILL) a third of the way in.", "",
        "| runs | submitted | refused at the door | met deadline | on the fallback model | ended as | hanging |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {d['submitted']} | {d['refused']} | {d['met']} | {d['on_fallback']} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(d['by_status'].items()))} | {d['hanging']} |"
          for name, d in (("may fall back", f), ("no fallback", n))], "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--parked", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--fallback-s", type=float, default=24.0)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--deadline-s", type=float, default=10.0)
    args = ap.parse_args()
    t0 = time.monotonic()
    stack = Stack(Path(tempfile.mkdtemp(prefix="fleet-bench-shapes-")), args.threads)
    try:
        fan = fan_out(stack, args.reps)
        print("fan-out", json.dumps(fan), flush=True)
        park = parked(stack, args.parked, args.probes)
        print("parked", json.dumps(park), flush=True)
        fb = fallback(stack, args.fallback_s, args.rate, args.deadline_s)
        print("fallback", json.dumps(fb), flush=True)
    finally:
        stack.close()
    text = report(fan, park, fb, time.monotonic() - t0, args.threads)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
