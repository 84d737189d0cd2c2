"""Benchmark: interactive latency under a batch backlog, fleet vs vanilla Celery, side by side.

Runs against the real local stack it starts itself (Redis, Triton with the dev model,
real Celery worker processes) and prints a Markdown report:

1. interactive runs at a steady rate, alone (idle baseline);
2. batch runs alone, draining a backlog (batch throughput alone);
3. the same interactive load while a backlog of batch runs drains;
4. 1 and 3 again with a vanilla Celery configuration of the same fleet (default prefetch,
   early ack, round-robin queues, no reserved capacity, no batch cap);
5. orchestration cost: a run of N steps on a zero-latency model vs a plain Celery chain of
   N no-op tasks on the same broker;
6. llm-step throughput through the fleet vs ``perf_analyzer`` straight to Triton at the
   same concurrency.

    python ops/bench/scheduling.py --out ops/bench/results/scheduling.md
    python ops/bench/scheduling.py --quick          # a smaller, faster smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fleet import launch  # noqa: E402
from fleet.client import FleetClient  # noqa: E402
from fleet.errors import Overloaded  # noqa: E402
from fleet.routing import worker_queues  # noqa: E402
from fleet.settings import Settings  # noqa: E402

# The dev model timed like a (fast) medium model; stated in the report.
MEDIUM = {"ttft_ms": 100, "prefill_ms_per_token": 0.1, "tpot_ms": 10, "load_factor": 0.02, "max_num_seqs": 64}
ZERO = {"ttft_ms": 0, "prefill_ms_per_token": 0, "tpot_ms": 0, "load_factor": 0, "max_num_seqs": 256}
CHAIN_STEPS = 10
THREADS = {"interactive_only": 4, "shared": 8}  # the fleet's inference threads; vanilla gets 12 too

AGENTS = {
    "bench_interactive": """
name = "bench_interactive"
description = "One model call of 16 tokens: a person waits."
result = "reply"
[inputs.text]
type = "string"
[example]
text = "hi"
[[steps]]
name = "reply"
kind = "llm"
prompt = "Reply to: {input.text}"
max_tokens = 16
""",
    "bench_batch": """
name = "bench_batch"
description = "One model call of 16 tokens: a script waits."
result = "summary"
[inputs.text]
type = "string"
[example]
text = "hi"
[[steps]]
name = "summary"
kind = "llm"
prompt = "Summarise: {input.text}"
max_tokens = 16
""",
    "bench_chain": "\n".join(
        ['name = "bench_chain"', 'description = "Ten one-token model calls on a zero-latency model."',
         f'result = "s{CHAIN_STEPS - 1}"', "[inputs.text]", 'type = "string"', "[example]", 'text = "hi"']
        + [f'[[steps]]\nname = "s{i}"\nkind = "llm"\nmodel = "medium_zero"\nprompt = "{{input.text}} {i}"\nmax_tokens = 1'
           for i in range(CHAIN_STEPS)]
    ),
}

NOOP_APP = '''
"""A plain Celery app for the baseline: a chain of no-op tasks, the last one signals done."""
import os
import redis
from celery import Celery

app = Celery("noop", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_hijack_root_logger=False)
_r = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@app.task(name="noop")
def noop(*_args, **_kwargs):
    return None


@app.task(name="done")
def done(*_args, key=None, **_kwargs):
    _r.lpush(key, "1")
'''


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Bench:
    root: Path
    redis_url: str
    triton: launch.TritonEndpoints
    procs: launch.Processes
    agents_dir: Path
    # What actually ran, filled in as it runs: the report is written from these.
    ran: dict = field(default_factory=dict)

    def settings(self, scheduling: str, **extra: str) -> tuple[Settings, dict[str, str]]:
        prefix = f"b{uuid.uuid4().hex[:6]}"
        env = {
            "FLEET_REDIS_URL": self.redis_url, "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
            "FLEET_TRITON_GRPC_URL": self.triton.grpc_url, "FLEET_TRITON_HTTP_URL": self.triton.http_url,
            "FLEET_AGENTS_DIR": str(self.agents_dir), "FLEET_SCHEDULING": scheduling,
            "FLEET_BATCH_DEADLINE_S": "86400", "FLEET_INTERACTIVE_DEADLINE_S": "30",
            "FLEET_LOG_LEVEL": "WARNING", **extra,
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return Settings(_env_file=None), env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_workers(self, settings: Settings, env: dict[str, str], client: FleetClient,
                      label: str | None = None) -> list[str]:
        host = "bench"
        if settings.scheduling == "fleet":
            specs = [("inf-interactive", ("interactive",), THREADS["interactive_only"]),
                     ("inf-shared", ("interactive", "batch"), THREADS["shared"])]
        else:  # same total threads, every worker takes both classes
            half = sum(THREADS.values()) // 2
            specs = [("inf-a", ("interactive", "batch"), half), ("inf-b", ("interactive", "batch"), half)]
        self.ran[label or settings.scheduling] = {
            "workers": [(name, "+".join(classes), threads) for name, classes, threads in specs],
            "batch_inflight_max": None if settings.scheduling != "fleet" else (
                settings.batch_inflight_max if settings.model_max_sequences is None else
                f"{settings.model_max_sequences} - reserve (min {settings.interactive_reserve_min})"),
        }
        nodes = []
        for name, classes, threads in specs:
            node = f"{name}-{uuid.uuid4().hex[:4]}@{host}"
            launch.start_worker(self.procs, name, worker_queues(settings, "llm", classes), "threads", threads,
                                env, node=node, loglevel="WARNING")
            nodes.append(node)
        for node in nodes:
            launch.wait_until(lambda n=node: launch.worker_answers(client.app, n), 60, node, None, 0.3)
        return [n.split("@")[0].rsplit("-", 1)[0] for n in nodes]

    def stop_workers(self, names: list[str]) -> None:
        for name in names:
            self.procs.stop(name)

    @contextmanager
    def namespace(self, scheduling: str, extra: dict[str, str] | None = None,
                  label: str | None = None) -> Iterator[FleetClient]:
        """A fresh fleet namespace with its workers (``extra``: FLEET_* settings of this
        configuration); stopped and wiped afterwards."""
        settings, env = self.settings(scheduling, **(extra or {}))
        client = FleetClient(settings)
        workers = self.start_workers(settings, env, client, label)
        try:
            yield client
        finally:
            self.stop_workers(workers)
            client.store.redis.flushdb()
            client.close()


def enqueue_backlog(client: FleetClient, n: int) -> list[str]:
    def one(i: int) -> str:
        return client.submit("bench_batch", {"text": f"backlog item {i}"}, priority="batch")

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def interactive_load(client: FleetClient, rate: float, seconds: float, deadline_s: float | None = None) -> list:
    """Submit interactive runs at a fixed rate for ``seconds``; return their final records."""
    ids: list[str] = []
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing an open-loop load generator
        ids.append(client.submit("bench_interactive", {"text": f"person {i}"}, deadline_s=deadline_s))
        i += 1
    return [client.wait(r, timeout=120) for r in ids]


BURST = 48


def burst(client: FleetClient, n: int, deadline_s: float) -> tuple[list, int]:
    """Submit ``n`` interactive runs at once; their final records and how many were refused."""
    ids, refused = [], 0
    for i in range(n):
        try:
            ids.append(client.submit("bench_interactive", {"text": f"burst {i}"}, deadline_s=deadline_s))
        except Overloaded:
            refused += 1
    return [client.wait(r, timeout=60) for r in ids], refused


def finished_between(client: FleetClient, ids: list[str], t0: float, t1: float) -> int:
    pipe = client.store.redis.pipeline()
    for r in ids:
        pipe.hget(client.store.run_key(r), "finished_at")
    return sum(1 for v in pipe.execute() if v is not None and t0 <= float(v) <= t1)


def latency_stats(runs: list) -> dict[str, float]:
    ok = [r.latency_s for r in runs if r.status == "succeeded"]
    return {"n": len(runs), "ok": len(ok), "p50": pct(ok, 50), "p99": pct(ok, 99),
            "expired": sum(r.status == "expired" for r in runs)}


def expired_reaching_triton(runs: list) -> tuple[int, int, int, int]:
    """Expired runs: (all, model call started after the deadline, never started, cut mid-call)."""
    expired = [r for r in runs if r.status == "expired"]
    late = sum(any(s.started_at and s.started_at >= r.deadline_at for s in r.steps) for r in expired)
    never = sum(not r.steps for r in expired)
    return len(expired), late, never, len(expired) - late - never


def scenario_backlog(b: Bench, scheduling: str, backlog: int, window: float, rate: float,
                     tight_deadline_s: float, extra: dict[str, str] | None = None, label: str | None = None) -> dict:
    with b.namespace(scheduling, extra, label) as client:
        # Warm the measurement of step times (admission) and the channels.
        for r in [client.submit("bench_interactive", {"text": "warm"}) for _ in range(4)]:
            client.wait(r, 30)
        idle = interactive_load(client, rate, window)
        ids = enqueue_backlog(client, backlog)
        queued_at_start = client.store.redis.llen(f"{client.settings.queue_prefix}llm.batch")
        t0 = time.time()
        loaded = interactive_load(client, rate, window)
        # A burst of people at once, each with a tight deadline: some of it cannot be served
        # in time, and what expires must not reach Triton after its deadline.
        tight, tight_refused = burst(client, BURST, tight_deadline_s)
        t1 = time.time()
        batch_done = finished_between(client, ids, t0, t1)
        return {"idle": latency_stats(idle), "loaded": latency_stats(loaded), "queued_at_start": queued_at_start,
                "batch_per_s": batch_done / (t1 - t0), "tight": expired_reaching_triton(tight),
                "tight_stats": latency_stats(tight), "tight_refused": tight_refused}


def scenario_batch_alone(b: Bench, backlog: int, window: float) -> float:
    with b.namespace("fleet") as client:
        ids = enqueue_backlog(client, backlog)
        t0 = time.time()
        time.sleep(window)  # measuring a drain rate over a fixed window
        return finished_between(client, ids, t0, time.time()) / window


def orchestration(b: Bench, sequential: int, concurrent: int) -> dict:
    out: dict[str, float] = {}
    with b.namespace("fleet") as client:
        client.wait(client.submit("bench_chain", {"text": "warm"}), 30)
        t = time.monotonic()
        for i in range(sequential):
            run = client.wait(client.submit("bench_chain", {"text": f"seq {i}"}), 60)
            assert run.status == "succeeded", run.error
        out["fleet_seq_s"] = (time.monotonic() - t) / sequential
        t = time.monotonic()
        ids = [client.submit("bench_chain", {"text": f"par {i}"}) for i in range(concurrent)]
        assert all(client.wait(r, 120).status == "succeeded" for r in ids)
        out["fleet_par_s"] = time.monotonic() - t

    # The baseline: the same number of steps as plain Celery no-op tasks in a chain.
    app_dir = b.root / "noop"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "noop_app.py").write_text(NOOP_APP)
    env = {"BENCH_REDIS_URL": b.redis_url, "PYTHONPATH": str(app_dir)}
    node = f"noop-{uuid.uuid4().hex[:4]}@bench"
    b.procs.start("noop", [sys.executable, "-m", "celery", "-A", "noop_app:app", "worker", "-P", "threads",
                           "-c", str(sum(THREADS.values())), "-n", node, "--loglevel=WARNING",
                           "--without-mingle", "--without-gossip"], env=env, cwd=app_dir)
    sys.path.insert(0, str(app_dir))
    os.environ["BENCH_REDIS_URL"] = b.redis_url
    import noop_app  # type: ignore[import-not-found]
    from celery import chain

    launch.wait_until(lambda: launch.worker_answers(noop_app.app, node), 60, "noop worker", None, 0.3)
    r = redis.Redis.from_url(b.redis_url)

    def one_chain(tag: str) -> chain:
        key = f"noop-done-{tag}"
        return chain(*[noop_app.noop.si() for _ in range(CHAIN_STEPS - 1)], noop_app.done.si(key=key)), key

    try:
        sig, key = one_chain("warm")
        sig.apply_async()
        r.blpop(key, 30)
        t = time.monotonic()
        for i in range(sequential):
            sig, key = one_chain(f"seq{i}")
            sig.apply_async()
            assert r.blpop(key, 60)
        out["celery_seq_s"] = (time.monotonic() - t) / sequential
        t = time.monotonic()
        keys = []
        for i in range(concurrent):
            sig, key = one_chain(f"par{i}")
            sig.apply_async()
            keys.append(key)
        for key in keys:
            assert r.blpop(key, 120)
        out["celery_par_s"] = time.monotonic() - t
    finally:
        b.procs.stop("noop")
        r.flushdb()
    return out


def perf_analyzer_binary(work: Path) -> Path | None:
    """perf_analyzer 2.51 from tritonclient's manylinux1 wheel, with the libraries it needs."""
    exe = work / "perf_analyzer"
    if exe.exists():
        return exe
    wheel_dir = work / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--platform", "manylinux1_x86_64", "--python-version", "3.11",
                          "tritonclient==2.51.0", "-d", str(wheel_dir)], capture_output=True, text=True)
    wheels = list(wheel_dir.glob("tritonclient-2.51.0-*manylinux1_x86_64.whl"))
    if got.returncode != 0 or not wheels:
        print(f"perf_analyzer unavailable: {got.stderr.strip()[:200]}", file=sys.stderr)
        return None
    with zipfile.ZipFile(wheels[0]) as zf:
        exe.write_bytes(zf.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
    exe.chmod(0o755)
    libs = launch._pytriton_dir().parent / "nvidia_pytriton.libs"
    lib_dir = work / "lib"
    lib_dir.mkdir(exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        if found and not (lib_dir / name).exists():
            (lib_dir / name).symlink_to(found[0])
    return exe


def perf_analyzer_throughput(b: Bench, concurrency: int, seconds: float) -> float | None:
    work = b.root / "perf"
    exe = perf_analyzer_binary(work)
    if exe is None:
        return None
    data = work / "input.json"
    data.write_text(json.dumps({"data": [{
        "text_input": ["Reply to: perf analyzer"], "stream": [True], "exclude_input_in_output": [True],
        "sampling_parameters": [json.dumps({"max_tokens": 16})],
    }]}))
    libs = launch._pytriton_dir().parent / "nvidia_pytriton.libs"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{work / 'lib'}:{libs}"}
    proc = subprocess.run([str(exe), "-m", "medium_sim", "-i", "grpc", "-u", b.triton.grpc_url, "--streaming",
                           "--concurrency-range", str(concurrency), "--input-data", str(data),
                           "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "50",
                           "--max-trials", "5"], env=env, capture_output=True, text=True, timeout=600)
    found = re.findall(r"Throughput:\s*([\d.]+) infer/sec", proc.stdout, flags=re.IGNORECASE)
    if found:
        return float(found[-1])
    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    return None


def fleet_llm_throughput(b: Bench, concurrency: int, seconds: float) -> float:
    done = [0]
    stop = threading.Event()
    with b.namespace("fleet") as client:
        client.wait(client.submit("bench_interactive", {"text": "warm"}), 30)

        def loop(k: int) -> None:
            i = 0
            while not stop.is_set():
                run = client.wait(client.submit("bench_interactive", {"text": f"closed loop {k} {i}"}), 60)
                if run.status == "succeeded" and not stop.is_set():
                    done[0] += 1
                i += 1

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        time.sleep(seconds)  # measuring a closed-loop throughput over a fixed window
        stop.set()
        for t in threads:
            t.join()
        return done[0] / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--window", type=float, default=45.0, help="seconds per measurement window")
    ap.add_argument("--rate", type=float, default=4.0, help="interactive runs per second")
    ap.add_argument("--tight-deadline", type=float, default=0.8, help="deadline of the burst's interactive runs")
    ap.add_argument("--quick", action="store_true", help="backlog 1000, 10 s windows")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    pool = ap.add_argument_group("pool shape")
    pool.add_argument("--max-seqs", type=int, default=MEDIUM["max_num_seqs"], help="the model's most sequences at once")
    pool.add_argument("--load-factor", type=float, default=MEDIUM["load_factor"],
                      help="how much each extra sequence slows a decode step")
    pool.add_argument("--tokens", type=int, default=16, help="tokens per model call")
    pool.add_argument("--interactive-threads", type=int, default=THREADS["interactive_only"])
    pool.add_argument("--shared-threads", type=int, default=THREADS["shared"])
    pool.add_argument("--batch-cap", type=int, default=None, help="the fleet's batch cap (default: the setting's)")
    ap.add_argument("--frontier", default=None, metavar="CAPS",
                    help="only the trade-off of batch policies: vanilla, then the fleet with each of CAPS "
                         "(comma-separated static caps, 'wc' for work-conserving slots over --max-seqs), "
                         "under the same backlog and interactive load")
    args = ap.parse_args()
    if args.quick:
        args.backlog, args.window = 1000, 10.0
    MEDIUM.update(max_num_seqs=args.max_seqs, load_factor=args.load_factor)
    THREADS.update(interactive_only=args.interactive_threads, shared=args.shared_threads)
    for name in ("bench_interactive", "bench_batch"):
        AGENTS[name] = AGENTS[name].replace("16 tokens", f"{args.tokens} tokens").replace(
            "max_tokens = 16", f"max_tokens = {args.tokens}")

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    procs = launch.Processes(root / "logs")
    started = time.time()
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        repo = launch.sim_repository(root / "models", **MEDIUM)
        launch.sim_repository(repo, name="medium_zero", **ZERO)
        triton = launch.start_triton(procs, root / "triton", ["medium_sim", "medium_zero"], repository=repo)
        agents_dir = root / "agents"
        agents_dir.mkdir()
        for name, text in AGENTS.items():
            (agents_dir / f"{name}.toml").write_text(text)
        b = Bench(root, redis_url, triton, procs, agents_dir)
        # The dev model's timing as the server loaded it (its config, read back from Triton).
        served = launch.http_json(f"http://{triton.http_url}/v2/models/medium_sim/config")
        b.ran["model"] = {k: v["string_value"] for k, v in served.get("parameters", {}).items()}

        if args.frontier:
            print("vanilla Celery: idle, then backlog ...", file=sys.stderr)
            rows = [("vanilla", scenario_backlog(b, "vanilla", args.backlog, args.window, args.rate,
                                                 args.tight_deadline))]
            for cap in args.frontier.split(","):
                # A number: a static cap; "wc": work-conserving slots over the model's capacity.
                label = "fleet work-conserving" if cap == "wc" else f"fleet cap {cap}"
                extra = ({"FLEET_MODEL_MAX_SEQUENCES": str(args.max_seqs)} if cap == "wc"
                         else {"FLEET_BATCH_INFLIGHT_MAX": cap})
                print(f"{label}: idle, then backlog ...", file=sys.stderr)
                rows.append((label, scenario_backlog(b, "fleet", args.backlog, args.window, args.rate,
                                                     args.tight_deadline, extra, label)))
            report = render_frontier(args, b.ran, rows, time.time() - started)
            print(report)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(report)
            return 0
        print("fleet scheduling: idle, then backlog ...", file=sys.stderr)
        fleet = scenario_backlog(b, "fleet", args.backlog, args.window, args.rate, args.tight_deadline,
                                 {"FLEET_BATCH_INFLIGHT_MAX": str(args.batch_cap)} if args.batch_cap else None)
        print("batch alone ...", file=sys.stderr)
        batch_alone = scenario_batch_alone(b, args.backlog, args.window)
        print("vanilla Celery: idle, then backlog ...", file=sys.stderr)
        vanilla = scenario_backlog(b, "vanilla", args.backlog, args.window, args.rate, args.tight_deadline)
        print("orchestration cost ...", file=sys.stderr)
        orch = orchestration(b, sequential=20 if args.quick else 50, concurrent=50 if args.quick else 200)
        print("llm-step throughput vs perf_analyzer ...", file=sys.stderr)
        conc = 8
        fleet_tput = fleet_llm_throughput(b, conc, args.window / 1.5)
        pa_tput = perf_analyzer_throughput(b, conc, args.window / 3)
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)

    report = render(args, b.ran, fleet, vanilla, batch_alone, orch, fleet_tput, pa_tput, conc, time.time() - started)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


def _command(args) -> str:  # noqa: ANN001
    """The command line that reproduces this run, every pool setting spelled out."""
    parts = ["python ops/bench/scheduling.py", "--quick" if args.quick else "", f"--backlog {args.backlog}",
             f"--window {args.window:g}", f"--rate {args.rate:g}", f"--tight-deadline {args.tight_deadline:g}",
             f"--max-seqs {args.max_seqs}", f"--load-factor {args.load_factor:g}", f"--tokens {args.tokens}",
             f"--interactive-threads {args.interactive_threads}", f"--shared-threads {args.shared_threads}"]
    if args.batch_cap:
        parts.append(f"--batch-cap {args.batch_cap}")
    if args.frontier:
        parts.append(f"--frontier {args.frontier}")
    return " ".join(p for p in parts if p)


def _workers(ran: dict, label: str) -> str:
    """The inference workers a configuration ran, as the report states them."""
    return " + ".join(f"{name} ({classes}, {threads} threads)" for name, classes, threads in ran[label]["workers"])


def _header(args, elapsed: float) -> list[str]:  # noqa: ANN001
    """Command and machine lines every report starts with."""
    return [f"Command: `{_command(args)}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"took {elapsed / 60:.1f} min.  "]


def render_frontier(args, ran, rows, elapsed) -> str:  # noqa: ANN001
    """The trade-off of static batch caps against vanilla Celery on the same pool."""
    model = ran["model"]
    vanilla = rows[0][1]
    lines = [
        "# Batch policies against vanilla Celery, one pool",
        "",
        *_header(args, elapsed),
        f"Dev model (its config as Triton loaded it): ttft {model['ttft_ms']} ms, {model['tpot_ms']} ms/token, "
        f"load factor {model['load_factor']}, max {model['max_num_seqs']} sequences; {args.tokens} tokens per call.  ",
        f"Vanilla: {_workers(ran, 'vanilla')}. Fleet: {_workers(ran, rows[1][0])}.",
        "",
        f"Interactive runs at {args.rate:g}/s for {args.window:g} s, idle and then with a backlog of "
        f"{args.backlog} batch runs draining; batch throughput measured over the loaded window.",
        "",
        "| configuration | batch cap | interactive p99 idle | p99 under backlog | ratio | batch runs/s | batch vs vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        cap = ran[label]["batch_inflight_max"]
        lines.append(
            f"| {label} | {cap if cap is not None else 'none'} | {r['idle']['p99']:.3f} | {r['loaded']['p99']:.3f} "
            f"| {r['loaded']['p99'] / r['idle']['p99']:.2f} | {r['batch_per_s']:.1f} "
            f"| {r['batch_per_s'] / vanilla['batch_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def render(args, ran, fleet, vanilla, batch_alone, orch, fleet_tput, pa_tput, conc, elapsed) -> str:  # noqa: ANN001
    def row(name: str, s: dict) -> str:
        return f"| {name} | {s['n']} | {s['p50']:.3f} | {s['p99']:.3f} | {s['expired']} |"

    f_ratio = fleet["loaded"]["p99"] / fleet["idle"]["p99"]
    v_ratio = vanilla["loaded"]["p99"] / vanilla["idle"]["p99"]
    v_vs_f = vanilla["loaded"]["p99"] / fleet["idle"]["p99"]
    tput_ratio = fleet["batch_per_s"] / batch_alone if batch_alone else float("nan")
    f_exp, f_late, f_never, f_cut = fleet["tight"]
    v_exp, v_late, v_never, v_cut = vanilla["tight"]
    seq_ratio = orch["fleet_seq_s"] / orch["celery_seq_s"]
    par_ratio = orch["fleet_par_s"] / orch["celery_par_s"]
    pa = f"{pa_tput:.1f}" if pa_tput else "n/a"
    pa_ratio = f"{fleet_tput / pa_tput:.2f}" if pa_tput else "n/a"
    model = ran["model"]
    lines = [
        "# Scheduling benchmark",
        "",
        *_header(args, elapsed),
        f"Dev model timing (its config as Triton loaded it): ttft {model['ttft_ms']} ms, prefill "
        f"{model['prefill_ms_per_token']} ms/token, {model['tpot_ms']} ms/token, load factor {model['load_factor']}, "
        f"max {model['max_num_seqs']} sequences; "
        f"every run is one model call of {args.tokens} tokens.  ",
        f"Fleet: {_workers(ran, 'fleet')}, batch cap {ran['fleet']['batch_inflight_max']} in flight at Triton. "
        f"Vanilla: {_workers(ran, 'vanilla')}, Celery defaults.",
        "",
        f"## Interactive latency (seconds, {args.rate:g} runs/s for {args.window:g} s)",
        "",
        "| scenario | runs | p50 | p99 | expired |",
        "|---|---|---|---|---|",
        row("fleet, idle", fleet["idle"]),
        row(f"fleet, {fleet['queued_at_start']} batch runs queued", fleet["loaded"]),
        row("vanilla Celery, idle", vanilla["idle"]),
        row(f"vanilla Celery, {vanilla['queued_at_start']} batch runs queued", vanilla["loaded"]),
        "",
        "## Ratios",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| fleet: interactive p99 under backlog / idle p99 | {f_ratio:.2f} | <= 1.2 |",
        f"| vanilla: interactive p99 under backlog / its idle p99 | {v_ratio:.2f} | (comparison) |",
        f"| vanilla p99 under backlog / fleet idle p99 | {v_vs_f:.2f} | (comparison) |",
        f"| fleet: batch throughput under interactive load / batch alone | {tput_ratio:.2f} "
        f"({fleet['batch_per_s']:.1f} / {batch_alone:.1f} runs/s) | >= 0.9 |",
        f"| vanilla: batch throughput under interactive load | {vanilla['batch_per_s']:.1f} runs/s | (comparison) |",
        f"| fleet: expired runs whose model call started after their deadline | {f_late} of {f_exp} "
        f"({f_never} expired before any call, {f_cut} cut mid-call at the deadline) | 0 |",
        f"| vanilla: the same | {v_late} of {v_exp} ({v_never} before any call, {v_cut} cut mid-call) "
        f"| (comparison) |",
        f"| orchestration: fleet run of {CHAIN_STEPS} steps / Celery chain of {CHAIN_STEPS} no-ops, one at a time "
        f"| {seq_ratio:.2f} ({orch['fleet_seq_s'] * 1000:.0f} / {orch['celery_seq_s'] * 1000:.0f} ms) | <= 1.0 |",
        f"| orchestration: same, many at once | {par_ratio:.2f} ({orch['fleet_par_s']:.1f} / "
        f"{orch['celery_par_s']:.1f} s) | <= 1.0 |",
        f"| llm-step throughput: fleet / perf_analyzer at concurrency {conc} | {pa_ratio} "
        f"({fleet_tput:.1f} / {pa} per s) | >= 0.9 |",
        "",
        f"Burst under backlog: {BURST} interactive runs submitted at once with a {args.tight_deadline:g} s deadline. "
        f"Fleet: {fleet['tight_refused']} refused at admission (predicted to miss), "
        f"{fleet['tight_stats']['ok']} of {fleet['tight_stats']['n']} admitted succeeded, "
        f"{fleet['tight_stats']['expired']} expired. Vanilla (no admission control): "
        f"{vanilla['tight_stats']['ok']} of {vanilla['tight_stats']['n']} succeeded, "
        f"{vanilla['tight_stats']['expired']} expired.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
