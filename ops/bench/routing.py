"""Benchmark: where model calls go across the pool, side by side in one run: routing by cached
prefix against most room, round robin and session affinity.

Starts its own Redis, ``--replicas`` Triton replicas of the dev model (whose engines cache prompt
prefixes as vLLM does, with a KV cache that holds the workload's working set across the pool but
not on one replica) and real Celery workers, and runs the same agent workload under each routing
mode, each in its own fleet namespace, one after the other on the same replicas:

- **interactive**: ``--sessions`` chat sessions at once, each of ``--turns`` turns (a person reads
  the reply, ``--think-s``, and answers with ``--message-words`` of text), every turn re-sending a
  shared system prompt of ``--system-words`` tokens and the growing transcript; a session that ends
  is followed by a new one;
- **batch**, at saturation: ``--batch-sessions`` conversations of the same agent run as batch (an
  evaluation replaying users: each turn sent as soon as the last one ended), and ``--batch-loops``
  scripts each running tool loops one after another (a model call, a calculator, a model call,
  behind a shared system prompt of their own).

The load runs ``--warmup`` seconds before the measured ``--window`` (so the window sees the
steady state, not the start) and until its end.

Each mode's prompts start with a salt of their own, so no mode finds another's blocks cached.
Reported from the engines' own counters and block traces (``vllm:prefix_cache_*``; the dev
model's ``block_trace_dir``): the prefix hit rate against what the workload could reuse at most
(an unbounded cache that saw every prompt in order), overall and beyond the shared system
prompts (which every replica soon holds, whatever the routing: the conversations' own context is
what routing decides), interactive time to first token and turn latency, batch runs per second,
the busiest replica's requests in flight over the mean (sampled every 0.25 s), and runs refused
or shed. ``--kill``: the cache router with one replica killed mid-run (runs lost, the hit
rate before, right after and once it recovered). ``--scaling``: the cache router on half the
replicas and on all of them.

    python ops/bench/routing.py --kill --scaling --out ops/bench/results/routing.md
    python ops/bench/routing.py --quick ...          # shorter windows
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops" / "bench"))
sys.path.insert(0, str(ROOT / "triton_models" / "medium_sim" / "1"))  # the dev model's engine: its tokens and blocks

import dev_engine as DEV  # noqa: E402
from common import pct, provenance  # noqa: E402

from fleet.broker.queues import worker_queues  # noqa: E402
from fleet.errors import Overloaded  # noqa: E402
from fleet.inference.replicas import ReplicaBoard  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.run.records import TERMINAL  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

BLOCK = 16
# Workload shapes: an agent's calls carry long context and answer briefly (a tool call, a short
# reply); a chat's carry short messages and answer at length. KV caches sized so that the
# conversations' context fits across the pool, not on one replica.
SHAPES = {
    "agent": {"message_words": 200, "reply_tokens": 32, "prefill_ms": 0.15, "kv_blocks": 1800},
    "chat": {"message_words": 60, "reply_tokens": 128, "prefill_ms": 0.1, "kv_blocks": 1200},
}
MODES = ("most_room", "round_robin", "session", "cache")
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "si", "tu", "va", "ze")
         for b in ("ba", "de", "fi", "go", "hu", "ja", "ki", "le", "mo", "ni", "pa", "qu", "re", "su", "ti")]


def text(seed: str, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_texts(system_words: int) -> dict[str, str]:
    return {"bench_chat": text("chat-system", system_words), "bench_solver": text("solver-system", system_words // 2)}


def agents(system_words: int, reply_tokens: int) -> dict[str, str]:
    """The workload's agents; each system prompt opens with the run's salt (one per mode)."""
    systems = system_texts(system_words)
    salt = '[inputs.salt]\ntype = "string"\ndescription = "Opens the system prompt."\n'
    return {
        "bench_chat": f'''name = "bench_chat"
description = "A support conversation."
system = "[{{input.salt}}] {systems['bench_chat']}"
result = "reply"
{salt}
[inputs.message]
type = "string"
description = "What the person says."
max_length = 20000

[example]
salt = "x"
message = "Hello"

[[steps]]
name = "reply"
kind = "llm"
prompt = "{{input.message}}"
max_tokens = {reply_tokens}
''',
        "bench_solver": f'''name = "bench_solver"
description = "A tool loop: the model calls the calculator, then answers from what it gave."
system = "[{{input.salt}}] {systems['bench_solver']}"
result = "think.final"
{salt}
[inputs.question]
type = "string"
description = "The question."

[example]
salt = "x"
question = "What is 2 + 3?"

[[steps]]
name = "solve"
kind = "loop"
max_iterations = 3
until = "think"

[[steps.body]]
name = "think"
kind = "llm"
prompt = "Question: {{input.question}}"
tools = ["calculator"]
max_tokens = 32
parse = "tool_call"

[[steps.body]]
name = "act"
kind = "tool"
tool_from = "think"
allowed_tools = ["calculator"]
''',
    }


# --- the pool and the fleet ---------------------------------------------------------------------

@dataclass
class Pool:
    root: Path
    redis_url: str
    procs: launch.Processes
    repo: Path
    agents_dir: Path
    trace_dir: Path
    args: argparse.Namespace
    ports: list[tuple[int, int, int]] = field(default_factory=list)
    endpoints: list[launch.TritonEndpoints] = field(default_factory=list)
    ran: dict = field(default_factory=dict)

    def start(self, i: int) -> None:
        ep = launch.start_triton(self.procs, self.root / f"triton-{i}", ["medium_sim"], name=f"triton-{i}",
                                 repository=self.repo, ports=self.ports[i])
        if i < len(self.endpoints):
            self.endpoints[i] = ep
        else:
            self.endpoints.append(ep)

    def replica_env(self, n: int) -> str:
        return json.dumps([{"name": f"r{i}", "grpc_url": ep.grpc_url, "metrics_url": ep.metrics_url}
                           for i, ep in enumerate(self.endpoints[:n])])

    def counters(self, n: int) -> dict[str, dict[str, float]]:
        """Each replica's engine counters (an unreachable one is left out)."""
        out = {}
        for i, ep in enumerate(self.endpoints[:n]):
            try:
                body = urllib.request.urlopen(ep.metrics_url, timeout=5).read().decode()
            except OSError:
                continue
            found: dict[str, float] = {}
            for line in body.splitlines():
                if line.startswith("vllm:") and 'model="medium_sim"' in line and not line.startswith("vllm:cache"):
                    found[line.split("{")[0]] = found.get(line.split("{")[0], 0.0) + float(line.rsplit(" ", 1)[1])
            out[f"r{i}"] = found
        return out

    def idle(self, n: int) -> None:
        """Wait until no engine runs or queues anything (the last mode's calls are gone)."""
        def quiet() -> bool:
            c = self.counters(n)
            return all(v.get("vllm:num_requests_running", 0) == 0 and v.get("vllm:num_requests_waiting", 0) == 0
                       for v in c.values())
        launch.wait_until(quiet, 120, "engines idle", None, 0.5)

    def fleet(self, mode: str, n: int, patience: str = "") -> tuple[Settings, dict[str, str], FleetClient, list[str]]:
        a = self.args
        prefix = f"b{uuid.uuid4().hex[:6]}"
        env = {"FLEET_REDIS_URL": self.redis_url, "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
               "FLEET_TRITON_GRPC_URL": self.endpoints[0].grpc_url, "FLEET_TRITON_HTTP_URL": self.endpoints[0].http_url,
               "FLEET_TRITON_REPLICAS": self.replica_env(n), "FLEET_AGENTS_DIR": str(self.agents_dir),
               "FLEET_ROUTING": mode, "FLEET_BATCH_DEADLINE_S": "86400", "FLEET_INTERACTIVE_DEADLINE_S": "30",
               "FLEET_LOG_LEVEL": "WARNING", "FLEET_MAX_INPUT_BYTES": "262144",
               **({"FLEET_ROUTING_PATIENCE_S": patience} if patience else {})}
        settings = settings_from(env)
        client = FleetClient(settings)
        specs = [("inf-interactive", "llm", ("interactive",), a.interactive_threads, "threads"),
                 ("inf-shared", "llm", ("interactive", "batch"), a.shared_threads * n // a.replicas, "threads"),
                 ("tools", "tool", ("interactive", "batch"), 2, "prefork")]
        names = []
        for name, kind, classes, threads, pool in specs:
            node = f"{name}-{uuid.uuid4().hex[:4]}@bench"
            launch.start_worker(self.procs, name, worker_queues(settings, kind, classes), pool, threads, env,
                                node=node, loglevel="WARNING")
            launch.wait_until(lambda nd=node: launch.worker_answers(client.app, nd), 60, node, None, 0.3)
            names.append(name)
        self.ran.setdefault("workers", [(name, "+".join(c), t) for name, _, c, t, _ in specs])
        self.ran.setdefault("settings", {"load_bound": settings.routing_load_bound,
                                         "cache_weight": settings.routing_cache_weight,
                                         "policy": settings.batch_policy})
        return settings, env, client, names

    def close(self, client: FleetClient, names: list[str]) -> None:
        for name in names:
            self.procs.stop(name)
        client.store.redis.flushdb()
        client.close()


def settings_from(env: dict[str, str]) -> Settings:
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings(_env_file=None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the workload -----------------------------------------------------------------------------

@dataclass
class Outcome:
    turns: list = field(default_factory=list)  # (submitted at, interactive run record)
    refused: list = field(default_factory=list)  # when a submission was refused
    batch_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def conversations(client: FleetClient, salt: str, args: argparse.Namespace, until: float, out: Outcome,
                  priority: str = "interactive") -> None:
    """Conversations at once until ``until``; one that ends is followed by a new one. Interactive:
    ``--sessions`` people who think ``--think-s`` between turns; batch: ``--batch-sessions`` replayed
    conversations, each turn sent when the last one ended."""
    people = args.sessions if priority == "interactive" else args.batch_sessions
    think = args.think_s if priority == "interactive" else 0.0

    def person(k: int) -> None:
        time.sleep(k * max(think, 1.0) / people)  # arrivals spread over a second or a think time
        n = 0
        while time.time() < until:
            session = f"{salt}-{priority[0]}{k}-{n}"
            for t in range(args.turns):
                if time.time() >= until:
                    return
                message = f"Turn {t} of {session}: " + text(f"{session}-{t}", args.message_words)
                run_id = submit(client, out, "bench_chat", {"salt": salt, "message": message}, priority,
                                session_id=session)
                if run_id is None:
                    time.sleep(max(think, 1.0))  # tries again after a while
                    continue
                run = client.wait(run_id, timeout=600)
                if priority == "interactive":
                    with out.lock:
                        out.turns.append((run.created_at, run))
                time.sleep(think)  # the person reads and types
            n += 1

    run_all(people, person)


def tool_loops(client: FleetClient, salt: str, args: argparse.Namespace, until: float, out: Outcome) -> None:
    """``--batch-loops`` scripts, each submitting a tool loop when its last one ended."""
    def script(k: int) -> None:
        i = 0
        while time.time() < until:
            a, b, c = (k * 7 + i) % 97, (k * 13 + i) % 89, i % 9 + 2
            run_id = submit(client, out, "bench_solver", {"salt": salt, "question": f"What is ({a} + {b}) * {c}?"},
                            "batch")
            if run_id is None:
                time.sleep(1.0)  # tries again after a while
            else:
                client.wait(run_id, timeout=600)
            i += 1

    run_all(args.batch_loops, script)


def submit(client: FleetClient, out: Outcome, agent: str, data: dict, priority: str, **options) -> str | None:  # noqa: ANN003
    try:
        run_id = client.submit(agent, data, priority=priority, **options)
    except Overloaded:
        with out.lock:
            out.refused.append(time.time())
        return None
    if priority == "batch":
        with out.lock:
            out.batch_ids.append(run_id)
    return run_id


def run_all(n: int, target) -> None:  # noqa: ANN001
    threads = [threading.Thread(target=target, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def sample_load(settings: Settings, client: FleetClient, since: float, until: float, samples: list[dict[str, int]],
                busy: list[float]) -> None:
    """Every 0.25 s of the window: each replica's requests in flight, and the share of the engines'
    sequences running."""
    board = ReplicaBoard(settings, client.store.redis)
    time.sleep(max(0.0, since - time.time()))  # the window opens
    while time.time() < until:
        states = [s for s in board.states() if s.up]
        samples.append({s.name: sum(s.inflight.values()) for s in states})
        cap = sum(s.capacity or 0 for s in states)
        if cap:
            busy.append(sum(s.running or 0 for s in states) / cap)
        time.sleep(0.25)  # a sampling period


def finished_between(client: FleetClient, ids: list[str], t0: float, t1: float) -> int:
    pipe = client.store.redis.pipeline()
    for r in ids:
        pipe.hget(client.store.run_key(r), "finished_at")
    return sum(1 for v in pipe.execute() if v is not None and t0 <= float(v) <= t1)


def shared_prefixes(salt: str, system_words: int) -> list[list[str]]:
    """The block hashes (as traced) of each agent's system line: blocks every replica soon holds."""
    out = []
    for system in system_texts(system_words).values():
        tokens = DEV.tokenize(f"[{salt}] {system}\n")
        out.append([h[:8].hex() for h in DEV.block_hashes(tokens, BLOCK)])
    return out


def traced(trace_dir: Path, t0: float, t1: float) -> list[dict]:
    """The engines' block trace entries of the window, in order of admission."""
    entries = []
    for path in trace_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if t0 <= e["t"] <= t1:
                entries.append(e)
    return sorted(entries, key=lambda e: e["t"])


def interactive_calls(entries: list[dict]) -> dict[str, float]:
    """Where the interactive (streamed) calls' time to first token went, at the engines: how long
    each waited there for a sequence slot (or KV blocks) before it was admitted, and how many of
    its prompt tokens it found uncached (their prefill is what routing can save)."""
    mine = [e for e in entries if e.get("s")]
    waits = [e["w"] for e in mine]
    uncached = [e["n"] - e["hit"] * BLOCK for e in mine]
    return {"wait_p50": pct(waits, 50), "wait_p99": pct(waits, 99),
            "uncached_p50": pct(uncached, 50), "uncached_p99": pct(uncached, 99)}


def reuse(entries: list[dict], shared: list[list[str]]) -> dict[str, float]:
    """From the engines' block traces of the window (in order of admission): the tokens looked up,
    found cached, and those an unbounded cache that saw every prompt would have found (vLLM's
    rule: a prompt's last token is never a hit); the same beyond the shared system prompts."""
    seen: set[str] = set()
    f = {"queries": 0, "hits": 0, "ideal": 0, "context_hits": 0, "context_ideal": 0}
    for e in entries:
        most = min(max(0, e["n"] - 1) // BLOCK, len(e["h"]))
        k = 0
        while k < most and e["h"][k] in seen:
            k += 1
        common = max((next((i for i, (a, b) in enumerate(zip(e["h"], s)) if a != b), min(len(e["h"]), len(s)))
                      for s in shared), default=0)
        f["queries"] += e["n"]
        f["hits"] += e["hit"] * BLOCK
        f["ideal"] += k * BLOCK
        f["context_hits"] += max(0, e["hit"] - common) * BLOCK
        f["context_ideal"] += max(0, k - common) * BLOCK
        seen.update(e["h"])
    return f


# --- scenarios --------------------------------------------------------------------------------

def run_mode(pool: Pool, mode: str, n: int, kill_at: float | None = None) -> dict:
    a = pool.args
    pool.idle(len(pool.endpoints))
    routing, _, patience = mode.partition("@")
    settings, _env, client, names = pool.fleet(routing, n, patience)
    salt = f"{routing}-{n}-{uuid.uuid4().hex[:6]}"
    out, samples, busy = Outcome(), [], []
    try:
        t0 = time.time() + a.warmup
        until = t0 + a.window
        threads = [threading.Thread(target=conversations, args=(client, salt, a, until, out, p), daemon=True)
                   for p in ("interactive", "batch")]
        threads.append(threading.Thread(target=tool_loops, args=(client, salt, a, until, out), daemon=True))
        threads.append(threading.Thread(target=sample_load, args=(settings, client, t0, until, samples, busy),
                                        daemon=True))
        for t in threads:
            t.start()
        if a.verbose:
            threading.Thread(target=show, args=(settings, client, until), daemon=True).start()
        time.sleep(max(0.0, t0 - time.time()))  # the warm-up
        timeline = watch_hits(pool, n, until, kill_at)
        for t in threads:
            t.join()
        t1 = time.time()
        found = summarize(pool, mode, n, out, samples, t0, t1, client, timeline, shared_prefixes(salt, a.system_words))
        found["engines_busy"] = sum(busy) / len(busy) if busy else float("nan")
        return found
    finally:
        if kill_at is not None:
            pool.start(n - 1)
        pool.close(client, names)


def show(settings: Settings, client: FleetClient, until: float) -> None:
    """Every 2 s on stderr: each replica's requests in flight, engine state and routes (--verbose)."""
    from fleet.scheduling.backlog import Backlog

    board, backlog = ReplicaBoard(settings, client.store.redis), Backlog(settings, client.store.redis)
    while time.time() < until:
        print(f"backlog {backlog.sizes()} dispatched {backlog.in_flight_count()} queues "
              f"{[client.store.redis.llen(q) for q in (settings.queue_prefix + 'llm.batch', settings.queue_prefix + 'llm.interactive', settings.queue_prefix + 'tool.batch')]} "
              f"waiters i/b {[client.store.redis.zcount(settings.keys.slot_waiters(p), time.time(), '+inf') for p in ('interactive', 'batch')]}",
              file=sys.stderr)
        print(" | ".join(f"{s.name}: in {s.inflight['interactive']}+{s.inflight['batch']} run {s.running} "
                         f"wait {s.waiting} pipe {s.pipeline} {s.routes}" for s in board.states()), file=sys.stderr)
        time.sleep(2.0)  # a display period


def watch_hits(pool: Pool, n: int, until: float, kill_at: float | None) -> list[tuple[float, dict]]:
    """Each engine's prefix counters (hits, queries) every 2 s; the last replica killed at ``kill_at`` (s)."""
    start, points, killed = time.time(), [], False
    while time.time() < until:
        c = pool.counters(n)
        points.append((time.time() - start, {r: (v.get("vllm:prefix_cache_hits_total", 0),
                                                 v.get("vllm:prefix_cache_queries_total", 0)) for r, v in c.items()}))
        if kill_at is not None and not killed and time.time() - start >= kill_at:
            pool.procs.stop(f"triton-{n - 1}", sig=signal.SIGKILL)
            killed = True
        time.sleep(2.0)  # a sampling period
    return points


def summarize(pool: Pool, mode: str, n: int, out: Outcome, samples: list, t0: float, t1: float,
              client: FleetClient, timeline: list, shared: list[list[str]]) -> dict:
    entries = traced(pool.trace_dir, t0, t1)
    f = reuse(entries, shared)
    turns = [r for at, r in out.turns if t0 <= at <= t1]
    ok = [r for r in turns if r.status == "succeeded"]
    ttft = [s.ttft_s for r in ok for s in r.steps if s.ttft_s is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    names = sorted({k for s in samples for k in s})
    mean_load = {r: sum(s.get(r, 0) for s in samples) / max(1, len(samples)) for r in names}
    overall = sum(mean_load.values()) / max(1, len(mean_load))
    batch = [client.get(r) for r in out.batch_ids]
    nan = float("nan")
    return {
        "mode": mode, "replicas": n, "window_s": t1 - t0,
        "hit_rate": f["hits"] / f["queries"] if f["queries"] else nan,
        "ideal_rate": f["ideal"] / f["queries"] if f["queries"] else nan,
        "of_ideal": f["hits"] / f["ideal"] if f["ideal"] else nan,
        "context_of_ideal": f["context_hits"] / f["context_ideal"] if f["context_ideal"] else nan,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "turn_p50": pct(lat, 50), "turn_p99": pct(lat, 99),
        "turns": len(turns), "turns_failed": len(turns) - len(ok), "refused": sum(t0 <= at <= t1 for at in out.refused),
        "batch_per_s": finished_between(client, out.batch_ids, t0, t1) / (t1 - t0),
        "batch_lost": sum(r.status in TERMINAL and r.status != "succeeded" for r in batch),
        "busiest_over_mean": max(mean_load.values()) / overall if overall else nan,
        "mean_load": mean_load, "timeline": timeline, **interactive_calls(entries),
    }


# --- the report -------------------------------------------------------------------------------

def row_of(rows: list[dict], mode: str) -> dict:
    return next(r for r in rows if r["mode"] == mode)


def render_modes(rows: list[dict], args: argparse.Namespace, prefill_ms: float) -> list[str]:
    base = row_of(rows, "most_room")
    lines = [f"## Routing modes side by side ({args.shape} shape)", "",
             f"{args.replicas} replicas; each mode its own namespace on the same replicas, for {args.window:g} s: "
             f"{args.sessions} interactive chat sessions at once ({args.turns} turns of {args.message_words} words, "
             f"{args.think_s:g} s between, replies of {args.reply_tokens} tokens, a system prompt of "
             f"{args.system_words}), {args.batch_sessions} batch conversations of the same agent (each turn sent "
             f"when the last ended) and {args.batch_loops} scripts running batch tool loops one after another; "
             f"measured over {args.window:g} s after {args.warmup:g} s of the same load.", "",
             "| routing | prefix hit rate (most possible) | of what could be reused | of the conversations' own context "
             "| TTFT p50 / p99 (interactive) | turn p50 / p99 | batch runs/s | batch vs most room "
             "| TTFT p50 vs most room | busiest replica / mean | engines' sequences running | refused | turns failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['hit_rate']:.1%} ({r['ideal_rate']:.1%}) | {r['of_ideal']:.0%} "
            f"| {r['context_of_ideal']:.0%} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
            f"{r['turn_p50']:.2f} / {r['turn_p99']:.2f} | {r['batch_per_s']:.2f} | "
            f"{r['batch_per_s'] / base['batch_per_s']:.2f} | {base['ttft_p50'] / r['ttft_p50']:.2f}x | "
            f"{r['busiest_over_mean']:.2f} | {r['engines_busy']:.0%} | {r['refused']} | {r['turns_failed']} of {r['turns']} |")
    lines += ["", "Where the interactive calls' time to first token went, at the engines (their block traces): the "
              "wait inside the engine for a sequence slot before admission (how full the chosen replica was), and "
              "the prompt tokens found uncached, whose prefill is what routing by cached prefix saves "
              f"({prefill_ms:g} ms a token here).", "",
              "| routing | TTFT p50 / p99 | waited in the engine p50 / p99 (s) | uncached prompt tokens p50 / p99 "
              "| their prefill p50 / p99 (s) |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | {r['wait_p50']:.3f} / {r['wait_p99']:.3f} "
            f"| {r['uncached_p50']:.0f} / {r['uncached_p99']:.0f} "
            f"| {r['uncached_p50'] * prefill_ms / 1000:.3f} / {r['uncached_p99'] * prefill_ms / 1000:.3f} |")
    return lines + [""]


def render_repeats(pairs: list[tuple[dict, dict]]) -> list[str]:
    """most_room and cache run again in turn: how far their ratios move from one run to the next."""
    lines = ["## most_room and cache again, in turn", "",
             "The first row is the table above; each later row ran most_room, then cache, on the same replicas.", "",
             "| run | TTFT p50 most_room / cache | TTFT p50 vs most room | TTFT p99 most_room / cache "
             "| batch runs/s most_room / cache | batch vs most room | cache: of what could be reused |",
             "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {"p50": [], "p99": [], "batch": []}
    for k, (base, cache) in enumerate(pairs, 1):
        ratios["p50"].append(base["ttft_p50"] / cache["ttft_p50"])
        ratios["p99"].append(base["ttft_p99"] / cache["ttft_p99"])
        ratios["batch"].append(cache["batch_per_s"] / base["batch_per_s"])
        lines.append(
            f"| {k} | {base['ttft_p50']:.3f} / {cache['ttft_p50']:.3f} | {ratios['p50'][-1]:.2f}x "
            f"| {base['ttft_p99']:.3f} / {cache['ttft_p99']:.3f} "
            f"| {base['batch_per_s']:.2f} / {cache['batch_per_s']:.2f} "
            f"| {ratios['batch'][-1]:.2f} | {cache['of_ideal']:.0%} |")
    lines += ["", f"Medians over the {len(pairs)} runs: TTFT p50 **{pct(ratios['p50'], 50):.2f}x** better (target 2x), "
              f"TTFT p99 most_room / cache **{pct(ratios['p99'], 50):.2f}** (target >= 1: not worse), "
              f"batch **{pct(ratios['batch'], 50):.2f}x** (target 1.5x); TTFT p99 most_room / cache ranged "
              f"{min(ratios['p99']):.2f} to {max(ratios['p99']):.2f}.", ""]
    return lines


def render_kill(k: dict, args: argparse.Namespace) -> list[str]:
    pts = k["timeline"]

    def rate(a: float, b: float) -> str:
        inside = [p for p in pts if a <= p[0] <= b]
        if len(inside) < 2:
            return "n/a"
        # Per engine, over the engines that answered at both ends: a killed one's counters are gone.
        first, last = inside[0][1], inside[-1][1]
        both = first.keys() & last.keys()
        dh = sum(last[r][0] - first[r][0] for r in both)
        dq = sum(last[r][1] - first[r][1] for r in both)
        return f"{dh / dq:.1%}" if dq > 0 else "n/a"

    kill = args.window / 3
    return ["## A replica killed mid-run (cache routing)", "",
            f"The last of {k['replicas']} replicas killed (SIGKILL) {kill:.0f} s into the window; its sessions move.", "",
            "| hit rate before | first 10 s after | from 10 s after to the end | turns failed | batch runs not succeeded | refused |",
            "|---|---|---|---|---|---|",
            f"| {rate(0, kill)} | {rate(kill, kill + 10)} | {rate(kill + 10, args.window)} | "
            f"{k['turns_failed']} of {k['turns']} | {k['batch_lost']} | {k['refused']} |", ""]


def render_scaling(half: dict, full: dict) -> list[str]:
    return ["## Scaling (cache routing)", "",
            "| replicas | prefix hit rate | TTFT p50 / p99 | batch runs/s |", "|---|---|---|---|",
            *[f"| {r['replicas']} | {r['hit_rate']:.1%} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
              f"{r['batch_per_s']:.2f} |" for r in (half, full)], "",
            f"{full['replicas']} replicas / {half['replicas']}: batch **{full['batch_per_s'] / half['batch_per_s']:.2f}x**.", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES),
                    help="routing modes; MODE@S sets FLEET_ROUTING_PATIENCE_S for that one")
    ap.add_argument("--window", type=float, default=45.0)
    ap.add_argument("--sessions", type=int, default=16, help="interactive conversations at once")
    ap.add_argument("--batch-sessions", type=int, default=48, help="batch conversations at once")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--think-s", type=float, default=1.0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="agent",
                    help="agent: long context, short replies (tool outputs, pasted text); chat: short messages, "
                    "long replies (flags override)")
    ap.add_argument("--message-words", type=int)
    ap.add_argument("--reply-tokens", type=int)
    ap.add_argument("--system-words", type=int, default=2000)
    ap.add_argument("--batch-loops", type=int, default=16, help="scripts running batch tool loops")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the window")
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--kv-blocks", type=int, help="each replica's KV cache, in blocks of 16 tokens")
    ap.add_argument("--prefill-ms", type=float, help="prefill per uncached prompt token")
    ap.add_argument("--tpot-ms", type=float, default=15.0)
    ap.add_argument("--load-factor", type=float, default=0.02)
    ap.add_argument("--interactive-threads", type=int, default=8)
    ap.add_argument("--shared-threads", type=int, default=48, help="for all replicas (scaled down with fewer)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run most_room and cache this many times in all, in turn (their ratios' spread)")
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--quick", action="store_true", help="20 s windows after 10 s of warm-up")
    ap.add_argument("--verbose", action="store_true", help="the pool's state every 2 s on stderr")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.window, args.warmup = 20.0, 10.0
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="fleet-routing-"))
    procs = launch.Processes(root / "logs")
    sections: list[str] = []
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        trace = root / "trace"
        repo = launch.sim_repository(root / "models", ttft_ms=20, prefill_ms_per_token=args.prefill_ms,
                                     tpot_ms=args.tpot_ms, load_factor=args.load_factor, max_num_seqs=args.max_seqs,
                                     num_gpu_blocks=args.kv_blocks, block_trace_dir=str(trace))
        agents_dir = root / "agents"
        agents_dir.mkdir()
        for name, body in agents(args.system_words, args.reply_tokens).items():
            (agents_dir / f"{name}.toml").write_text(body)
        pool = Pool(root, redis_url, procs, repo, agents_dir, trace, args)
        for i in range(args.replicas):
            pool.ports.append((launch.free_port(), launch.free_port(), launch.free_port()))
            pool.start(i)
        served = launch.http_json(f"http://{pool.endpoints[0].http_url}/v2/models/medium_sim/config")
        pool.ran["model"] = {k: v["string_value"] for k, v in served.get("parameters", {}).items()}
        rows = []
        for mode in args.modes.split(","):
            print(f"{mode} ...", file=sys.stderr)
            rows.append(run_mode(pool, mode, args.replicas))
        sections += render_modes(rows, args, float(pool.ran["model"]["prefill_ms_per_token"]))
        if args.repeat > 1:
            pairs = [(row_of(rows, "most_room"), row_of(rows, "cache"))]
            for k in range(2, args.repeat + 1):
                print(f"most_room and cache, run {k} of {args.repeat} ...", file=sys.stderr)
                pairs.append((run_mode(pool, "most_room", args.replicas), run_mode(pool, "cache", args.replicas)))
            sections += render_repeats(pairs)
        if args.kill:
            print("cache, a replica killed ...", file=sys.stderr)
            sections += render_kill(run_mode(pool, "cache", args.replicas, kill_at=args.window / 3), args)
        if args.scaling:
            print("cache on half the replicas ...", file=sys.stderr)
            half = run_mode(pool, "cache", args.replicas // 2)
            sections += render_scaling(half, row_of(rows, "cache"))
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
    m = pool.ran["model"]
    report = "\n".join(["# Routing benchmark", "", *provenance(time.time() - started),
                        f"Dev model on each replica, as Triton loaded it: ttft {m['ttft_ms']} ms, prefill "
                        f"{m['prefill_ms_per_token']} ms per uncached token, {m['tpot_ms']} ms/token, load factor "
                        f"{m['load_factor']}, max {m['max_num_seqs']} sequences, KV cache {m['num_gpu_blocks']} blocks "
                        f"of {m['block_size']} tokens, prefix caching {m['enable_prefix_caching']}. Workers per mode: "
                        + ", ".join(f"{n} ({c}, {t})" for n, c, t in pool.ran["workers"])
                        + f"; load bound {pool.ran['settings']['load_bound']}, cache weight "
                        f"{pool.ran['settings']['cache_weight']}, batch policy {pool.ran['settings']['policy']}.", "",
                        *sections])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
