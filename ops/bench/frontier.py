"""Benchmark: the latency-throughput frontier of the inference pool's batch policies.

For each pool shape (``saturated``: few sequences; ``default``: sequences to spare; ``steep``: each
running sequence slows every decode step a lot, as long contexts or a big model per GPU do), on
its own Triton replica of the dev model, side by side:

- vanilla Celery (the batch throughput every point is compared with);
- static batch caps from small to the replica's full capacity;
- ``preempt`` (batch uses every slot; an interactive request takes a batch one's);
- the objective policy (``preempt`` with ``FLEET_OBJECTIVE_TTFT_P99_S`` and
  ``FLEET_OBJECTIVE_TPOT_P99_S``, no margin) asked to hold what each static cap measured in the
  same run, so that each static point has the objective point that should dominate it;
- batch borrowing the interactive-only worker's idle threads (``FLEET_INFERENCE_BORROW``), with
  ``preempt`` and with the middle objective point.

Each configuration: a backlog of batch runs drains while interactive runs (one streamed model call)
arrive at a steady rate; after a settling time (the pool monitor learns the engine), a window
measures the interactive TTFT and TPOT p99 (at Triton: first token, then the gaps between tokens)
and the batch runs finished; then a burst of interactive runs with a tight deadline.

    python ops/bench/frontier.py --quick --out ops/bench/results/frontier.md --plot ops/bench/results/frontier.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scheduling as sched  # noqa: E402  (the stack, the load generators)
from common import pct, provenance  # noqa: E402

from fleet.inference.replicas import ReplicaBoard  # noqa: E402
from fleet.ops import launch  # noqa: E402

POOLS = {
    "saturated": {"max_seqs": 8, "load_factor": 0.05, "interactive_threads": 8, "shared_threads": 16,
                  "caps": (2, 4, 8)},
    "default": {"max_seqs": 64, "load_factor": 0.02, "interactive_threads": 4, "shared_threads": 8,
                "caps": (4, 8, 16)},
    "steep": {"max_seqs": 16, "load_factor": 0.25, "interactive_threads": 8, "shared_threads": 24,
              "caps": (2, 4, 8)},
}
TOKENS = 16
#: A measured p99 within this factor of its objective meets it.
WITHIN = 1.10


def interactive_stats(runs: list) -> dict[str, float]:
    """Interactive TTFT and TPOT p99 at Triton (the step's model call), and the run's latency."""
    ok = [r for r in runs if r.status == "succeeded" and r.steps and r.steps[0].ttft_s is not None]
    ttft = [r.steps[0].ttft_s for r in ok]
    tpot = [(r.steps[0].model_s - r.steps[0].ttft_s) / (r.steps[0].tokens_out - 1) for r in ok
            if r.steps[0].model_s is not None and r.steps[0].tokens_out > 1]
    return {"n": len(runs), "ok": len(ok), "ttft_p99": pct(ttft, 99), "tpot_p99": pct(tpot, 99),
            "ttft_p50": pct(ttft, 50), "tpot_p50": pct(tpot, 50), "run_p99": pct([r.latency_s for r in ok], 99)}


def scenario_idle(b: sched.Bench, args) -> dict:  # noqa: ANN001
    """Interactive runs alone on the pool (preempt): the figures objectives are set from."""
    with b.namespace("idle", {"FLEET_BATCH_POLICY": "preempt"}) as client:
        for r in [client.submit("bench_interactive", {"text": "warm"}) for _ in range(4)]:
            client.wait(r, 30)
        runs, _ = sched.interactive_load(client, args.rate, args.window)
        return interactive_stats(runs)


def scenario_loaded(b: sched.Bench, label: str, extra: dict[str, str], args) -> dict:  # noqa: ANN001
    """A backlog drains while interactive runs arrive; then a burst with a tight deadline."""
    with b.namespace(label, extra) as client:
        for r in [client.submit("bench_interactive", {"text": "warm"}) for _ in range(4)]:
            client.wait(r, 30)
        ids = sched.enqueue_backlog(client, args.backlog)
        settle, _ = sched.interactive_load(client, args.rate, args.settle)  # the monitor learns meanwhile
        t0 = time.time()
        loaded, refused = sched.interactive_load(client, args.rate, args.window)
        t1 = time.time()
        batch_done = sched.finished_between(client, ids, t0, t1)
        states = ReplicaBoard(client.settings, client.store.redis).states()
        tight = sched.burst(client, sched.BURST, args.tight_deadline)
        return {**interactive_stats(loaded), "batch_per_s": batch_done / (t1 - t0), "refused": refused,
                "batch_limit": states[0].batch_limit if states else None,
                "measured": states[0].measured if states else {}, "burst": tight}


def baselines(pool: dict) -> list[tuple[str, str, dict[str, str], dict]]:
    """(label, kind, settings, objective): vanilla, the static caps from small to full, preempt."""
    out = [("vanilla Celery", "vanilla", {"FLEET_SCHEDULING": "vanilla"}, {})]
    caps = sorted({min(cap, pool["max_seqs"]) for cap in pool["caps"]} | {pool["max_seqs"]})
    for cap in caps:
        out.append((f"static cap {cap}" + (" (full)" if cap == pool["max_seqs"] else ""), "static",
                    {"FLEET_BATCH_POLICY": "static", "FLEET_BATCH_INFLIGHT_MAX": str(cap)}, {}))
    out.append(("preempt", "preempt", {"FLEET_BATCH_POLICY": "preempt"}, {}))
    return out


def objective_points(statics: list[dict]) -> list[tuple[str, str, dict[str, str], dict]]:
    """The objective policy asked to hold what each static cap measured (its TTFT and TPOT p99, with
    no margin: the question is whether it then gets at least that cap's batch throughput), and the
    middle one again, and preempt, with batch borrowing the interactive-only threads."""
    out = []
    for s in statics:
        objective = {"ttft": round(s["ttft_p99"], 4), "tpot": round(s["tpot_p99"], 4)}
        env = {"FLEET_BATCH_POLICY": "preempt", "FLEET_OBJECTIVE_MARGIN": "1.0",
               "FLEET_OBJECTIVE_TTFT_P99_S": str(objective["ttft"]), "FLEET_OBJECTIVE_TPOT_P99_S": str(objective["tpot"])}
        out.append((f"objective: {s['label']}'s p99", "objective", env, objective))
    borrow = {"FLEET_INFERENCE_BORROW": "true"}
    out.append(("preempt, borrowing", "borrow", {"FLEET_BATCH_POLICY": "preempt", **borrow}, {}))
    label, _, env, objective = out[len(statics) // 2]
    out.append((f"{label}, borrowing", "objective+borrow", {**env, **borrow}, objective))
    return out


def run_pool(name: str, args, root: Path, procs: launch.Processes, redis_url: str) -> dict:  # noqa: ANN001
    """Every configuration on one pool shape, on a Triton replica of its own."""
    pool = POOLS[name]
    repo = launch.sim_repository(root / f"models-{name}", **sched.TIMING, load_factor=pool["load_factor"],
                                 max_num_seqs=pool["max_seqs"])
    ep = launch.start_triton(procs, root / f"triton-{name}", ["medium_sim"], name=f"triton-{name}", repository=repo)
    agents_dir = root / f"agents-{name}"
    agents_dir.mkdir()
    for agent, what in (("bench_interactive", "a person waits"), ("bench_batch", "a script waits")):
        (agents_dir / f"{agent}.toml").write_text(sched.agent_toml(agent, what, TOKENS))
    b = sched.Bench(root, redis_url, [sched.Replica("triton-0", ep, (0, 0, 0))], procs, agents_dir, repo,
                    {"interactive_only": pool["interactive_threads"], "shared": pool["shared_threads"]})
    served = launch.http_json(f"http://{ep.http_url}/v2/models/medium_sim/config")
    model = {k: v["string_value"] for k, v in served.get("parameters", {}).items()}
    try:
        print(f"{name}: idle ...", file=sys.stderr)
        idle = scenario_idle(b, args)
        points = []
        for label, kind, extra, objective in baselines(pool):
            print(f"{name}: {label} ...", file=sys.stderr)
            points.append({"label": label, "kind": kind, "objective": objective,
                           **scenario_loaded(b, label, extra, args)})
        for label, kind, extra, objective in objective_points([p for p in points if p["kind"] == "static"]):
            print(f"{name}: {label} ...", file=sys.stderr)
            points.append({"label": label, "kind": kind, "objective": objective,
                           **scenario_loaded(b, label, extra, args)})
    finally:
        procs.stop(f"triton-{name}")
    return {"pool": name, "shape": pool, "model": model, "idle": idle, "points": points,
            "workers": sched._workers(b.ran, "preempt")}


def verdicts(res: dict) -> dict:
    """The issue's targets on one pool: objectives met, domination of the static caps, the default pool's
    pair of figures, burst admission."""
    pts, idle = res["points"], res["idle"]
    vanilla = next(p["batch_per_s"] for p in pts if p["kind"] == "vanilla")
    for p in pts:
        p["vs_vanilla"] = p["batch_per_s"] / vanilla if vanilla else float("nan")
        p["met"] = (None if not p["objective"] else
                    p["ttft_p99"] <= WITHIN * p["objective"]["ttft"] and p["tpot_p99"] <= WITHIN * p["objective"]["tpot"])
    objectives = [p for p in pts if p["kind"].startswith("objective")]
    dominated = {}
    for s in (p for p in pts if p["kind"] == "static"):
        dominated[s["label"]] = next((o["label"] for o in objectives
                                      if o["ttft_p99"] <= 1.05 * s["ttft_p99"] and o["tpot_p99"] <= 1.05 * s["tpot_p99"]
                                      and o["batch_per_s"] >= 0.95 * s["batch_per_s"]), None)
    fleet_points = [p for p in pts if p["kind"] != "vanilla" and p["burst"]["admitted"]]
    within = [(p["label"], p["run_p99"] / idle["run_p99"], p["vs_vanilla"]) for p in pts
              if p["kind"] != "vanilla" and p["run_p99"] <= 1.2 * idle["run_p99"]]
    return {"dominated": dominated, "best_pair": max(within, key=lambda t: t[2]) if within else None,
            "burst": {p["label"]: p["burst"]["met"] / p["burst"]["admitted"] for p in fleet_points}}


def render_pool(res: dict, v: dict) -> list[str]:
    m, idle = res["model"], res["idle"]
    lines = [f"## Pool `{res['pool']}`", "",
             f"Dev model as Triton loaded it: ttft {m['ttft_ms']} ms, {m['tpot_ms']} ms/token, load factor "
             f"{m['load_factor']}, max {m['max_num_seqs']} sequences; {TOKENS} tokens per call. Workers: {res['workers']}.",
             f"Idle (interactive alone): TTFT p99 {idle['ttft_p99']:.3f} s, TPOT p99 {idle['tpot_p99'] * 1000:.1f} ms, "
             f"run p99 {idle['run_p99']:.3f} s.", "",
             "| configuration | objective TTFT / TPOT p99 | TTFT p99 | TPOT p99 | run p99 / idle | batch runs/s "
             "| batch vs vanilla | batch limit at the end | engine histograms' p99 TTFT / TPOT | burst met / admitted "
             "| objective met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        obj = (f"{p['objective']['ttft']:.3f} s / {p['objective']['tpot'] * 1000:.1f} ms" if p["objective"] else "-")
        eng = p["measured"]
        engine = (f"{eng.get('ttft', float('nan')):.3f} s / {eng.get('tpot', float('nan')) * 1000:.1f} ms"
                  if eng else "-")
        bu = p["burst"]
        met = "-" if p["met"] is None else ("**yes**" if p["met"] else "**no**")
        lines.append(f"| {p['label']} | {obj} | {p['ttft_p99']:.3f} s | {p['tpot_p99'] * 1000:.1f} ms "
                     f"| {p['run_p99'] / idle['run_p99']:.2f} | {p['batch_per_s']:.1f} | {p['vs_vanilla']:.2f} "
                     f"| {p['batch_limit'] if p['batch_limit'] is not None else '-'} | {engine} "
                     f"| {bu['met']} / {bu['admitted']} | {met} |")
    dom = v["dominated"]
    lines += ["", "Static caps and the objective point that dominates each (no worse TTFT and TPOT p99 within 5%, "
              "at least its batch throughput within 5%): " + "; ".join(
                  f"{s}: {o or '**none**'}" for s, o in dom.items()) + ".",
              ("Interactive run p99 <= 1.2x idle with the most batch: " + (
                  f"{v['best_pair'][0]} (run p99 {v['best_pair'][1]:.2f}x idle, batch {v['best_pair'][2]:.2f}x "
                  f"vanilla: batch >= 0.95x vanilla {'met' if v['best_pair'][2] >= 0.95 else '**missed**'})."
                  if v["best_pair"] else "**no point**.")),
              "Burst of interactive runs: share of admitted that met their deadline: " + ", ".join(
                  f"{k} {s:.0%}" for k, s in v["burst"].items()) + ".", ""]
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    styles = {"static": ("o-", "tab:blue"), "preempt": ("s", "tab:red"), "objective": ("^-", "tab:green"),
              "borrow": ("D", "tab:purple"), "objective+borrow": ("*", "tab:olive"), "vanilla": ("x", "black")}
    for col, res in enumerate(results):
        for row, (key, unit, scale) in enumerate((("tpot_p99", "ms", 1000), ("ttft_p99", "s", 1))):
            ax = axes[row][col]
            for kind, (style, color) in styles.items():
                pts = sorted((p for p in res["points"] if p["kind"] == kind), key=lambda p: p["vs_vanilla"])
                if pts:
                    ax.plot([p["vs_vanilla"] for p in pts], [p[key] * scale for p in pts], style, color=color,
                            label=kind)
                for p in pts:
                    if kind.startswith("objective"):
                        ax.axhline(p["objective"][key.split("_")[0]] * scale, color=color, lw=0.5, ls=":")
            ax.axhline(res["idle"][key] * scale, color="grey", lw=0.8, ls="--", label="idle")
            ax.set_title(f"{res['pool']}: interactive {key.split('_')[0].upper()} p99")
            ax.set_xlabel("batch throughput / vanilla")
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="saturated,default,steep")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of the measured window")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds of load before the window")
    ap.add_argument("--backlog", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=6.0, help="interactive runs per second")
    ap.add_argument("--tight-deadline", type=float, default=0.8, help="deadline of the burst's runs")
    ap.add_argument("--quick", action="store_true", help="12 s windows, 5 s settling, a backlog of 1500")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.window, args.settle, args.backlog = 12.0, 5.0, min(args.backlog, 1500)
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-frontier-"))
    procs = launch.Processes(root / "logs")
    started = time.time()
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        results = [run_pool(name, args, root, procs, redis_url) for name in args.pools.split(",")]
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
    lines = ["# Frontier: interactive latency against batch throughput", "", *provenance(time.time() - started), "",
             f"Interactive runs at {args.rate:g}/s; a backlog of {args.backlog} batch runs; {args.settle:g} s of "
             f"settling, then a {args.window:g} s window; a burst of {sched.BURST} interactive runs with a "
             f"{args.tight_deadline:g} s deadline. TTFT and TPOT are the interactive model calls' own, at Triton "
             f"(first token; the gaps between tokens); objective points are met when both p99 are within "
             f"{WITHIN - 1:.0%} of their objectives (each static cap's own p99, held with FLEET_OBJECTIVE_MARGIN=1). "
             "A request's TPOT is the mean of its gaps between tokens; p99 over requests. The engine histograms' p99 "
             "(what `fleet status` shows) is interpolated inside vLLM's buckets (0.1 to 0.25 s for TTFT, 25 to 50 ms "
             "for TPOT) and counts every token, batch's too.", ""]
    for res in results:
        lines += render_pool(res, verdicts(res))
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
