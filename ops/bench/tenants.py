"""Benchmark: the batch backlog and the fair share of batch model time between tenants.

Starts its own Redis, a Triton replica serving the dev model and real Celery worker
processes (the pool shapes of ops/bench/scheduling.py: the model is the bottleneck), and
measures, side by side in one run:

- **alone**: tenant B's batch of ``--small`` runs on an otherwise idle fleet (its time alone);
- **fair share by weight**: tenant A queues ``--big`` batch runs, then B queues ``--small``;
  while both are backlogged, each tenant's share of batch model time (from the step records:
  the model time of llm steps that falls in the window), and how long B's runs take
  compared with alone. Once with the weights 1:1, once with B weighing 3 (3:1);
- **interactive under this load**: interactive runs at a steady rate, idle and then while
  both tenants are backlogged (p99 ratio; in the 3:1 case, so that the 1:1 case compares B's
  time with B alone on the same batch-only load);
- **scale**: ``--scale`` batch runs queued from one client (submit rate, Redis bytes per
  queued run, the figure for a million), then the dispatcher's first pass over that backlog
  and a newcomer tenant's wait behind it.

    python ops/bench/tenants.py --out ops/bench/results/tenants.md

Every setting in the report is read back from what ran: the model's config as Triton loaded
it, the tenants and the dispatch window as the fleet's settings and workers give them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scheduling as sched  # noqa: E402  (the pool shapes, the stack and the load generators)
from common import provenance  # noqa: E402

from fleet.broker.queues import queue_name  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.run.records import TERMINAL, RunRecord  # noqa: E402
from fleet.scheduling.backlog import Backlog  # noqa: E402
from fleet.scheduling.dispatch import Dispatcher  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

CHUNK = 1000
INPUT = ("section {i} of the quarterly report: revenue, costs, hiring and the outlook for the next two "
         "quarters, in plain words for the board")


def tenants_env(weight_a: float, weight_b: float) -> dict[str, str]:
    return {"FLEET_TENANTS": json.dumps([{"name": "tenant-a", "weight": weight_a},
                                         {"name": "tenant-b", "weight": weight_b}])}


def submit(client: FleetClient, n: int, tag: str, batch_id: str) -> tuple[list[str], float]:
    """``n`` batch runs from one client in chunks of submit_many; their ids and the seconds it took."""
    ids: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        subs = [{"agent": "bench_batch", "priority": "batch", "input": {"text": INPUT.format(i=i)},
                 "idempotency_key": f"{batch_id}:{tag}-{i:07d}"} for i in range(start, min(n, start + CHUNK))]
        results = client.submit_many(subs, batch_id=batch_id)
        bad = [r.error for r in results if r.error is not None]
        if bad:
            raise SystemExit(f"submission refused: {bad[0]}")
        ids += [r.run_id for r in results]
    return ids, time.perf_counter() - t0


def dispatched_at(client: FleetClient, run_id: str) -> float | None:
    """When the dispatcher created the run: the time of its first event (None: not yet)."""
    first = client.store.redis.xrange(client.store.events_key(run_id), count=1)
    return int(first[0][0].split("-")[0]) / 1000 if first else None


def records(client: FleetClient, ids: list[str]) -> list[RunRecord]:
    out: list[RunRecord] = []
    for start in range(0, len(ids), CHUNK):
        out += [r for r in client.store.get_many(ids[start:start + CHUNK]) if r is not None]
    return out


def wait_all(client: FleetClient, ids: list[str], timeout_s: float) -> float:
    """Wait until every run ended (statuses read in pipelined chunks); when the last ended."""
    deadline = time.monotonic() + timeout_s
    left = list(ids)
    while left and time.monotonic() < deadline:
        statuses = client.store.statuses(left[:CHUNK])
        ended = {r for r, s in zip(left[:CHUNK], statuses) if s in TERMINAL}
        left = [r for r in left if r not in ended]
        if left:
            time.sleep(0.2)  # polling the statuses of a batch, as `fleet batch run` does
    if left:
        raise SystemExit(f"{len(left)} runs did not end within {timeout_s:.0f} s")
    return max(r.finished_at or 0.0 for r in records(client, ids))


def model_time(runs: list[RunRecord], t0: float, t1: float) -> float:
    """Model seconds of the runs' llm steps that fall in [t0, t1] (a call's model time ends at
    its step's finish)."""
    total = 0.0
    for run in runs:
        for step in run.steps:
            if step.kind != "llm" or not step.model_s or step.finished_at is None:
                continue
            start, end = step.finished_at - step.model_s, step.finished_at
            total += max(0.0, min(end, t1) - max(start, t0))
    return total


def window_of(client: FleetClient) -> tuple[int, str]:
    """The dispatch window as the fleet computes it, and where it comes from."""
    d = Dispatcher(client.settings, client.app, client.agents, client.store)
    if client.settings.batch_dispatch_window is not None:
        return d.window(), "FLEET_BATCH_DISPATCH_WINDOW"
    threads = d.capacity.slots_for(queue_name(client.settings, "llm", "batch"))
    return d.window(), f"2 x {threads} batch worker threads"


def scenario_alone(b: sched.Bench, args) -> dict:  # noqa: ANN001
    with b.namespace("alone", tenants_env(1, 1)) as client:
        tb = FleetClient(client.settings, tenant="tenant-b")
        ids, _ = submit(tb, args.small, "alone", "alone")
        t0 = time.time()
        last = wait_all(tb, ids, 600)
        b.ran["alone"]["window"] = window_of(client)
        tb.close()
        return {"seconds": last - t0}


def scenario_share(b: sched.Bench, label: str, weights: tuple[float, float], args,  # noqa: ANN001
                   interactive: bool) -> dict:
    with b.namespace(label, tenants_env(*weights)) as client:
        ta = FleetClient(client.settings, tenant="tenant-a")
        tb = FleetClient(client.settings, tenant="tenant-b")
        out: dict = {"weights": {t: client.settings.tenant_registry.weight(t) for t in ("tenant-a", "tenant-b")}}
        if interactive:
            for r in [client.submit("bench_interactive", {"text": "warm"}) for _ in range(4)]:
                client.wait(r, 30)
            idle, _ = sched.interactive_load(client, args.rate, args.window)
            out["idle"] = sched.latency_stats(idle)
        a_ids, _ = submit(ta, args.big, "a", "big")
        # B arrives once A's runs flow through a full pool.
        launch.wait_until(lambda: sum(s in TERMINAL for s in ta.store.statuses(a_ids[:200])) >= 100, 300,
                          "tenant A's first runs")
        b_ids, _ = submit(tb, args.small, "b", "small")
        t_join = time.time()
        loaded: list = []
        load = None
        if interactive:
            load = threading.Thread(target=lambda: loaded.append(sched.interactive_load(client, args.rate,
                                                                                        args.window)))
            load.start()
        b_last = wait_all(tb, b_ids, 900)
        if load is not None:
            load.join()
            out["loaded"] = sched.latency_stats(loaded[0][0])
        b_runs = records(tb, b_ids)
        t_end = max(dispatched_at(tb, r) or 0.0 for r in b_ids)  # B's last dispatch: both backlogged until then
        a_dispatched = [r for r in a_ids if dispatched_at(ta, r) is not None]
        # The runs of A that ran in the window end soon after it: wait for those.
        a_window = [r for r in a_dispatched if (dispatched_at(ta, r) or 0.0) <= t_end]
        wait_all(ta, a_window, 300)
        a_runs = records(ta, a_window)
        a_s, b_s = model_time(a_runs, t_join, t_end), model_time(b_runs, t_join, t_end)
        out.update({"b_seconds": b_last - t_join, "window_s": t_end - t_join, "a_model_s": a_s, "b_model_s": b_s,
                    "b_share": b_s / (a_s + b_s), "a_dispatched_in_window": len(a_window),
                    "a_backlog_left": Backlog(client.settings, client.store.redis).sizes().get("tenant-a", 0)})
        b.ran[label]["window"] = window_of(client)
        ta.close()
        tb.close()
        return out


def scenario_scale(b: sched.Bench, args) -> dict:  # noqa: ANN001
    """No workers: the backlog, then one dispatcher pass in this process."""
    settings, env = b.settings({**tenants_env(1, 1), "FLEET_BATCH_DISPATCH_WINDOW": "10000"})
    ta = FleetClient(settings, tenant="tenant-a")
    tb = FleetClient(settings, tenant="tenant-b")
    r = ta.store.redis
    try:
        before = r.info("memory")["used_memory"]
        ids, seconds = submit(ta, args.scale, "scale", "scale")
        after = r.info("memory")["used_memory"]
        [newcomer], _ = submit(tb, 1, "newcomer", "newcomer")
        dispatcher = Dispatcher(settings, ta.app, ta.agents, ta.store)
        t0 = time.perf_counter()
        first = dispatcher.tick()
        first_s = time.perf_counter() - t0
        newcomer_first = dispatched_at(tb, newcomer) is not None
        # Dispatch throughput: passes until 5,000 runs are created and sent (no worker takes them).
        t1 = time.perf_counter()
        sent = first
        while sent < 5000:
            sent += dispatcher.tick()
        rate = (sent - first) / (time.perf_counter() - t1)
        bytes_per_run = (after - before) / args.scale
        return {"n": args.scale, "submit_per_s": args.scale / seconds, "bytes_per_run": bytes_per_run,
                "first_pass_s": first_s, "first_pass_runs": first, "newcomer_first": newcomer_first,
                "dispatch_per_s": rate, "window": settings.batch_dispatch_window,
                "input_bytes": len(json.dumps({"text": INPUT.format(i=0)}))}
    finally:
        r.flushdb()
        ta.close()
        tb.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", choices=sorted(sched.POOLS), default="saturated", help="pool shape preset")
    ap.add_argument("--big", type=int, default=5000, help="tenant A's batch")
    ap.add_argument("--small", type=int, default=200, help="tenant B's batch")
    ap.add_argument("--scale", type=int, default=200_000, help="runs queued for the scale figures")
    ap.add_argument("--rate", type=float, default=4.0, help="interactive runs per second")
    ap.add_argument("--window", type=float, default=15.0, help="seconds of interactive load, idle and loaded")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    pool = sched.POOLS[args.pool]
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-tenants-"))
    procs = launch.Processes(root / "logs")
    started = time.time()
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        repo = launch.sim_repository(root / "models", **sched.TIMING, load_factor=pool["load_factor"],
                                     max_num_seqs=pool["max_seqs"])
        ep = launch.start_triton(procs, root / "triton-0", ["medium_sim"], name="triton-0", repository=repo)
        agents_dir = root / "agents"
        agents_dir.mkdir()
        for name, what in (("bench_interactive", "a person waits"), ("bench_batch", "a script waits")):
            (agents_dir / f"{name}.toml").write_text(sched.agent_toml(name, what, pool["tokens"]))
        b = sched.Bench(root, redis_url, [sched.Replica("triton-0", ep, (0, 0, 0))], procs, agents_dir, repo,
                        {"interactive_only": pool["interactive_threads"], "shared": pool["shared_threads"]})
        served = launch.http_json(f"http://{ep.http_url}/v2/models/medium_sim/config")
        b.ran["model"] = {k: v["string_value"] for k, v in served.get("parameters", {}).items()}
        print("scale: a big backlog from one client ...", file=sys.stderr)
        scale = scenario_scale(b, args)
        print("tenant B alone ...", file=sys.stderr)
        alone = scenario_alone(b, args)
        print("weights 1:1 ...", file=sys.stderr)
        even = scenario_share(b, "weights 1:1", (1, 1), args, interactive=False)
        print("weights 1:3, with interactive load ...", file=sys.stderr)
        heavy = scenario_share(b, "weights 1:3", (1, 3), args, interactive=True)
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = render(args, pool, b.ran, scale, alone, even, heavy, time.time() - started)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


def render(args, pool: dict, ran: dict, scale: dict, alone: dict, even: dict, heavy: dict,  # noqa: ANN001
           elapsed: float) -> str:
    m = ran["model"]
    command = (f"python ops/bench/tenants.py --pool {args.pool} --big {args.big} --small {args.small} "
               f"--scale {args.scale} --rate {args.rate:g} --window {args.window:g}"
               + (f" --out {args.out}" if args.out else ""))
    window, why = ran["weights 1:1"]["window"]
    lines = [
        "# Tenants benchmark: batch backlog and fair share", "",
        *provenance(elapsed, command),
        f"Dev model on one Triton replica, its config as Triton loaded it: ttft {m['ttft_ms']} ms, prefill "
        f"{m['prefill_ms_per_token']} ms/token, {m['tpot_ms']} ms/token, load factor {m['load_factor']}, max "
        f"{m['max_num_seqs']} sequences; one model call of {pool['tokens']} tokens per run.  ",
        f"Workers: {sched._workers(ran, 'weights 1:1')}; dispatch window {window} runs ({why}).", "",
        "## Fair share of batch model time", "",
        f"Tenant A queues {args.big} batch runs; once its first runs are through, tenant B queues {args.small}. "
        "Shares are the model time of each tenant's llm steps (step records) that falls in the window where both "
        "are backlogged (from B's submission to B's last dispatch). B alone: the same batch on an idle fleet, "
        "in this run.", "",
        "| weights A:B | window s | A model s | B model s | B share | target | B's runs took | alone | ratio "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in (("weights 1:1", even), ("weights 1:3", heavy)):
        w = r["weights"]
        target = w["tenant-b"] / (w["tenant-a"] + w["tenant-b"])
        ratio = r["b_seconds"] / alone["seconds"]
        lines.append(
            f"| {w['tenant-a']:g}:{w['tenant-b']:g} | {r['window_s']:.1f} | {r['a_model_s']:.1f} "
            f"| {r['b_model_s']:.1f} | **{r['b_share']:.1%}** | {target:.0%} ± 5 | {r['b_seconds']:.1f} s "
            f"| {alone['seconds']:.1f} s | {ratio:.2f} | {'<= 2.2' if target == 0.5 else '-'} |")
    i, l = heavy["idle"], heavy["loaded"]
    lines += [
        "", "## Interactive runs under this load", "",
        f"Interactive runs at {args.rate:g}/s for {args.window:g} s, idle and then while both tenants are "
        "backlogged (weights 1:3; the 1:1 case runs without them, so that B's time compares with B alone).", "",
        "| | TTFT p50 / p99 | run p50 / p99 | runs |", "|---|---|---|---|",
        f"| idle | {i['ttft_p50']:.3f} / {i['ttft_p99']:.3f} | {i['p50']:.3f} / {i['p99']:.3f} | {i['ok']} of {i['n']} |",
        f"| both tenants backlogged | {l['ttft_p50']:.3f} / {l['ttft_p99']:.3f} | {l['p50']:.3f} / {l['p99']:.3f} "
        f"| {l['ok']} of {l['n']} |", "",
        f"Run p99 under load / idle: **{l['p99'] / i['p99']:.2f}** (the saturated pool's target, <= 1.5, as in the scheduling benchmark).", "",
        "## Scale", "",
        f"{scale['n']:,} batch runs queued by one client (submit_many in chunks of {CHUNK}; inputs of "
        f"{scale['input_bytes']} bytes, each with an idempotency key and a batch id), no worker running.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| submit rate, one client | {scale['submit_per_s']:,.0f} runs/s | >= 2,000 |",
        f"| Redis bytes per queued run (used_memory delta / runs) | {scale['bytes_per_run']:.0f} B | <= 1,024 |",
        f"| Redis for {scale['n']:,} queued runs | {scale['bytes_per_run'] * scale['n'] / 2**20:.0f} MiB | |",
        f"| Redis for 1,000,000 queued runs (extrapolated) | {scale['bytes_per_run'] * 1e6 / 2**20:.0f} MiB | |",
        f"| dispatcher's first pass with {scale['n']:,} queued (window {scale['window']}) "
        f"| {scale['first_pass_s'] * 1000:.0f} ms for {scale['first_pass_runs']} runs created and sent | |",
        f"| a newcomer tenant's run, queued behind them, in that first pass | "
        f"{'yes' if scale['newcomer_first'] else 'no'} | yes |",
        f"| dispatch rate (runs created and their chains sent) | {scale['dispatch_per_s']:,.0f} runs/s | hundreds |",
        ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
