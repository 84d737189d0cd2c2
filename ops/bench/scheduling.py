"""Benchmark: scheduling of the inference pool, side by side in one run.

Starts its own Redis, Triton replicas serving the dev model (its shape from flags: sequence
capacity, load factor, tokens per call) and real Celery worker processes, and measures:

- **policies** (the default): for vanilla Celery (default prefetch, early ack, round-robin
  queues, no reserved capacity, no slots) and each of the fleet's batch policies, on the
  same pool: interactive runs at a steady rate alone (idle), the same while a backlog of
  batch runs drains (interactive TTFT and run latency, batch throughput, interactive
  requests the engine made wait for a slot, preemptions), then a burst of interactive runs
  with a tight deadline (admitted, met their deadline, refused, goodput);
- ``--scaling``: batch throughput of the fleet on one replica and on ``--replicas`` replicas;
- ``--kill``: a replica killed under load (SIGKILL) and started again: runs lost, the
  replica's return;
- ``--costs``: orchestration cost against a plain Celery chain, and the fleet's llm-step
  throughput against ``perf_analyzer`` straight to Triton.

    python ops/bench/scheduling.py --pool saturated --out ops/bench/results/scheduling-saturated.md
    python ops/bench/scheduling.py --pool default --out ops/bench/results/scheduling-default.md
    python ops/bench/scheduling.py --replicas 2 --scaling --kill --out ops/bench/results/replicas.md
    python ops/bench/scheduling.py --costs --out ops/bench/results/costs.md
    python ops/bench/scheduling.py --quick ...          # shorter windows, a smaller backlog

Every setting in a report is read back from what ran: the model's config as Triton loaded
it, the fleet's settings as its workers parsed them, the replicas' capacity and pipeline
depth as the fleet recorded them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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
sys.path.insert(0, str(ROOT / "ops" / "bench"))

from common import provenance  # noqa: E402

from fleet.broker.queues import worker_queues  # noqa: E402
from fleet.errors import Overloaded  # noqa: E402
from fleet.inference.replicas import ReplicaBoard  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.run.records import TERMINAL  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

# Pool shapes. saturated: the model is the bottleneck (few sequences, each one slowing the
# others a lot, worker threads three times the capacity); default: the dev model timed like
# a fast medium model with sequences to spare, where worker threads bound throughput.
POOLS = {
    "saturated": {"max_seqs": 8, "load_factor": 0.05, "tokens": 16, "interactive_threads": 8,
                  "shared_threads": 16, "backlog": 3000, "rate": 4.0, "policies": "vanilla,static:4,static:8,reserve,preempt:0,preempt"},
    "default": {"max_seqs": 64, "load_factor": 0.02, "tokens": 16, "interactive_threads": 4,
                "shared_threads": 8, "backlog": 10000, "rate": 4.0, "policies": "vanilla,static:8,reserve,preempt,preempt/shared"},
}
TIMING = {"ttft_ms": 100, "prefill_ms_per_token": 0.1, "tpot_ms": 10}
ZERO = {"ttft_ms": 0, "prefill_ms_per_token": 0, "tpot_ms": 0, "load_factor": 0, "max_num_seqs": 256}
CHAIN_STEPS = 10
BURST = 48


def agent_toml(name: str, what: str, tokens: int, model: str | None = None) -> str:
    return "\n".join([
        f'name = "{name}"', f'description = "One model call of {tokens} tokens: {what}."', 'result = "out"',
        "[inputs.text]", 'type = "string"', "[example]", 'text = "hi"', "[[steps]]", 'name = "out"', 'kind = "llm"',
        *([f'model = "{model}"'] if model else []), f'prompt = "{what}: {{input.text}}"', f"max_tokens = {tokens}"])


def chain_toml() -> str:
    return "\n".join(
        ['name = "bench_chain"', 'description = "Ten one-token model calls on a zero-latency model."',
         f'result = "s{CHAIN_STEPS - 1}"', "[inputs.text]", 'type = "string"', "[example]", 'text = "hi"']
        + [f'[[steps]]\nname = "s{i}"\nkind = "llm"\nmodel = "medium_zero"\nprompt = "{{input.text}} {i}"\nmax_tokens = 1'
           for i in range(CHAIN_STEPS)])

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
class Replica:
    name: str
    endpoints: launch.TritonEndpoints
    ports: tuple[int, int, int]


@dataclass
class Bench:
    root: Path
    redis_url: str
    replicas: list[Replica]
    procs: launch.Processes
    agents_dir: Path
    repo: Path
    threads: dict[str, int]
    # What actually ran, filled in as it runs: the report is written from these.
    ran: dict = field(default_factory=dict)

    @property
    def triton(self) -> launch.TritonEndpoints:
        return self.replicas[0].endpoints

    def replica_env(self, n: int) -> str:
        return json.dumps([{"name": r.name, "grpc_url": r.endpoints.grpc_url, "metrics_url": r.endpoints.metrics_url}
                           for r in self.replicas[:n]])

    def settings(self, extra: dict[str, str]) -> tuple[Settings, dict[str, str]]:
        prefix = f"b{uuid.uuid4().hex[:6]}"
        env = {
            "FLEET_REDIS_URL": self.redis_url, "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
            "FLEET_TRITON_GRPC_URL": self.triton.grpc_url, "FLEET_TRITON_HTTP_URL": self.triton.http_url,
            "FLEET_TRITON_REPLICAS": self.replica_env(1), "FLEET_AGENTS_DIR": str(self.agents_dir),
            "FLEET_BATCH_DEADLINE_S": "86400", "FLEET_INTERACTIVE_DEADLINE_S": "30", "FLEET_LOG_LEVEL": "WARNING",
            # The zero-latency model of the orchestration cost, served by the same replicas.
            "FLEET_MODELS": json.dumps([{"name": "medium_zero"}]),
            **extra,
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

    def start_workers(self, settings: Settings, env: dict[str, str], client: FleetClient, label: str,
                      shared_only: bool = False) -> list[str]:
        if settings.scheduling == "fleet" and not shared_only:
            specs = [("inf-interactive", ("interactive",), self.threads["interactive_only"]),
                     ("inf-shared", ("interactive", "batch"), self.threads["shared"])]
            specs = [spec for spec in specs if spec[2] > 0]
        else:  # the same threads in all, every worker takes both classes
            half = sum(self.threads.values()) // 2
            specs = [("inf-a", ("interactive", "batch"), half), ("inf-b", ("interactive", "batch"), half)]
        self.ran[label] = {
            "workers": [(name, "+".join(classes), threads) for name, classes, threads in specs],
            "scheduling": settings.scheduling, "policy": settings.batch_policy,
            "batch_inflight_max": settings.batch_inflight_max, "pipeline_max": settings.pipeline_max,
            "preempt_victims": settings.preempt_victims,
            "reserve_min": settings.interactive_reserve_min, "replicas": [r.name for r in settings.replicas()],
        }
        nodes = []
        for name, classes, threads in specs:
            node = f"{name}-{uuid.uuid4().hex[:4]}@bench"
            launch.start_worker(self.procs, name, worker_queues(settings, "llm", classes), "threads", threads,
                                env, node=node, loglevel="WARNING")
            nodes.append(node)
        for node in nodes:
            launch.wait_until(lambda n=node: launch.worker_answers(client.app, n), 60, node, None, 0.3)
        return [n.split("@")[0].rsplit("-", 1)[0] for n in nodes]

    @contextmanager
    def namespace(self, label: str, extra: dict[str, str] | None = None,
                  shared_only: bool = False) -> Iterator[FleetClient]:
        """A fresh fleet namespace with its workers (``extra``: FLEET_* settings of this
        configuration; ``shared_only``: every thread takes both classes); what the pool
        recorded is kept in ``ran``, then it is stopped and wiped."""
        settings, env = self.settings(extra or {})
        client = FleetClient(settings)
        workers = self.start_workers(settings, env, client, label, shared_only)
        try:
            yield client
        finally:
            states = ReplicaBoard(settings, client.store.redis).states()
            self.ran[label]["pool"] = [{"name": s.name, "capacity": s.capacity, "pipeline": s.pipeline,
                                        "peak": s.peak, "preempted": s.preempted} for s in states]
            for name in workers:
                self.procs.stop(name)
            client.store.redis.flushdb()
            client.close()


def policy_env(spec: str) -> tuple[str, dict[str, str]]:
    """A configuration's label and settings: vanilla, static:N, reserve, preempt[:K[:V]];
    ``/shared`` after a fleet policy: no interactive-only worker, every thread shared."""
    spec = spec.removesuffix("/shared")
    kind, _, arg = spec.partition(":")
    if kind == "vanilla":
        return "vanilla Celery", {"FLEET_SCHEDULING": "vanilla"}
    if kind == "static":
        return f"static cap {arg}", {"FLEET_BATCH_POLICY": "static", "FLEET_BATCH_INFLIGHT_MAX": arg}
    if kind == "reserve":
        return "reserve", {"FLEET_BATCH_POLICY": "reserve"}
    if kind == "preempt":
        depth, _, victims = arg.partition(":")
        label = "preempt" + (f", pipeline max {depth}" if depth else "") + (f", {victims} victims" if victims else "")
        return label, {"FLEET_BATCH_POLICY": "preempt", **({"FLEET_PIPELINE_MAX": depth} if depth else {}),
                       **({"FLEET_PREEMPT_VICTIMS": victims} if victims else {})}
    raise SystemExit(f"unknown policy {spec!r}: vanilla, static:N, reserve, preempt[:K[:V]]")


def enqueue_backlog(client: FleetClient, n: int, agent: str = "bench_batch") -> list[str]:
    def one(i: int) -> str:
        return client.submit(agent, {"text": f"backlog item {i}"}, priority="batch")

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def interactive_load(client: FleetClient, rate: float, seconds: float) -> tuple[list, int]:
    """Submit interactive runs at a fixed rate for ``seconds``: their final records, and how
    many admission refused."""
    ids: list[str] = []
    refused = 0
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing an open-loop load generator
        try:
            ids.append(client.submit("bench_interactive", {"text": f"person {i}"}))
        except Overloaded:
            refused += 1
        i += 1
    return [client.wait(r, timeout=120) for r in ids], refused


def burst(client: FleetClient, n: int, deadline_s: float) -> dict:
    """``n`` interactive runs submitted at once with a tight deadline."""
    ids, refused, retry = [], 0, []
    for i in range(n):
        try:
            ids.append(client.submit("bench_interactive", {"text": f"burst {i}"}, deadline_s=deadline_s))
        except Overloaded as exc:
            refused += 1
            retry.append(exc.retry_after_s)
    runs = [client.wait(r, timeout=60) for r in ids]
    met = sum(r.status == "succeeded" and r.latency_s is not None and r.latency_s <= deadline_s for r in runs)
    return {"admitted": len(ids), "met": met, "refused": refused, "expired": sum(r.status == "expired" for r in runs),
            "retry_after_s": (min(retry), max(retry)) if retry else None}


def finished_between(client: FleetClient, ids: list[str], t0: float, t1: float) -> int:
    pipe = client.store.redis.pipeline()
    for r in ids:
        pipe.hget(client.store.run_key(r), "finished_at")
    return sum(1 for v in pipe.execute() if v is not None and t0 <= float(v) <= t1)


def latency_stats(runs: list) -> dict[str, float]:
    ok = [r for r in runs if r.status == "succeeded"]
    lat = [r.latency_s for r in ok]
    ttft = [r.steps[0].ttft_s for r in ok if r.steps and r.steps[0].ttft_s is not None]
    return {"n": len(runs), "ok": len(ok), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "expired": sum(r.status == "expired" for r in runs)}


def engine_counters(b: Bench) -> dict[str, float]:
    """The dev model's own counters, summed over the replicas (Triton's metrics port)."""
    out: dict[str, float] = {}
    for rep in b.replicas:
        try:
            text = urllib.request.urlopen(rep.endpoints.metrics_url, timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("medium_sim:", "vllm:")) and 'model="medium_sim"' in line:
                name = line.split("{")[0] + ('{stream}' if 'stream="true"' in line else "")
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def scenario_policy(b: Bench, label: str, extra: dict[str, str], args, shared_only: bool = False) -> dict:  # noqa: ANN001
    with b.namespace(label, extra, shared_only) as client:
        for r in [client.submit("bench_interactive", {"text": "warm"}) for _ in range(4)]:
            client.wait(r, 30)
        idle, idle_refused = interactive_load(client, args.rate, args.window)
        ids = enqueue_backlog(client, args.backlog)
        queued = client.store.redis.llen(f"{client.settings.queue_prefix}llm.batch")
        before = engine_counters(b)
        t0 = time.time()
        loaded, loaded_refused = interactive_load(client, args.rate, args.window)
        t1 = time.time()
        after = engine_counters(b)
        batch_done = finished_between(client, ids, t0, t1)
        tight = burst(client, BURST, args.tight_deadline)
        waits = "medium_sim:slot_waits_total{stream}"
        return {"idle": latency_stats(idle), "loaded": latency_stats(loaded), "queued_at_start": queued,
                "refused": idle_refused + loaded_refused, "batch_per_s": batch_done / (t1 - t0),
                "interactive_waited": after.get(waits, 0) - before.get(waits, 0),
                "interactive_requests": len(loaded), "burst": tight}


def scenario_drain(b: Bench, label: str, extra: dict[str, str], backlog: int, window: float) -> float:
    """Batch runs (long calls) draining alone: runs per second over ``window``."""
    with b.namespace(label, extra) as client:
        ids = enqueue_backlog(client, backlog, "bench_batch_long")
        time.sleep(2.0)  # let the pipeline fill before measuring a steady drain rate
        t0 = time.time()
        time.sleep(window)  # measuring a drain rate over a fixed window
        return finished_between(client, ids, t0, time.time()) / window


def scenario_kill(b: Bench, args) -> dict:  # noqa: ANN001
    """Two replicas under batch and interactive load; the last one is killed, then started again."""
    victim = b.replicas[-1]
    label = "kill"
    extra = {"FLEET_BATCH_POLICY": "preempt", "FLEET_TRITON_REPLICAS": b.replica_env(len(b.replicas))}
    with b.namespace(label, extra) as client:
        board = ReplicaBoard(client.settings, client.store.redis)
        ids = enqueue_backlog(client, args.kill_backlog, "bench_batch_long")
        load: dict = {}
        loader = threading.Thread(target=lambda: load.update(zip(("runs", "refused"), interactive_load(
            client, args.rate, args.window))))
        loader.start()
        time.sleep(args.window / 3)  # let work reach both replicas before the kill
        at_kill = next(s for s in board.states() if s.name == victim.name).inflight
        b.procs.stop(victim.name, sig=signal.SIGKILL)
        killed_at = time.time()
        time.sleep(args.window / 3)  # the pool runs on the other replica meanwhile
        down = next(s for s in board.states() if s.name == victim.name)
        capacity_while_down = board.healthy_capacity()
        launch.start_triton(b.procs, b.root / victim.name, ["medium_sim", "medium_zero"], name=victim.name,
                            repository=b.repo, ports=victim.ports)
        back_at = time.time()
        loader.join()
        runs = [client.wait(r, timeout=600) for r in ids]
        served_after = sum(1 for r in runs for s in r.steps if s.replica == victim.name and (s.started_at or 0) > back_at)
        statuses = [r.status for r in runs + load["runs"]]
        return {"batch": len(ids), "interactive": len(load["runs"]), "refused": load["refused"],
                "completed": statuses.count("succeeded"), "expired": statuses.count("expired"),
                "dead_lettered": statuses.count("dead_lettered"), "lost": sum(s not in TERMINAL for s in statuses), "inflight_at_kill": at_kill,
                "down_state": "up" if down.up else "down", "down_reason": down.reason,
                "capacity_while_down": capacity_while_down, "capacity_after": board.healthy_capacity(),
                "served_after_return": served_after, "down_s": back_at - killed_at}


def orchestration(b: Bench, sequential: int, concurrent: int) -> dict:
    out: dict[str, float] = {}
    with b.namespace("costs") as client:
        client.wait(client.submit("bench_chain", {"text": "warm"}), 30)
        t = time.monotonic()
        for i in range(sequential):
            run = client.wait(client.submit("bench_chain", {"text": f"seq {i}"}), 60)
            assert run.status == "succeeded", run.error
        out["fleet_seq_s"] = (time.monotonic() - t) / sequential
        t = time.monotonic()
        # Admission forecasts from the default model's step time, not the zero-latency model's:
        # a deadline that covers the burst, so that what is timed is the orchestration.
        ids = [client.submit("bench_chain", {"text": f"par {i}"}, deadline_s=600) for i in range(concurrent)]
        assert all(client.wait(r, 120).status == "succeeded" for r in ids)
        out["fleet_par_s"] = time.monotonic() - t

    # The baseline: the same number of steps as plain Celery no-op tasks in a chain.
    app_dir = b.root / "noop"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "noop_app.py").write_text(NOOP_APP)
    env = {"BENCH_REDIS_URL": b.redis_url, "PYTHONPATH": str(app_dir)}
    node = f"noop-{uuid.uuid4().hex[:4]}@bench"
    b.procs.start("noop", [sys.executable, "-m", "celery", "-A", "noop_app:app", "worker", "-P", "threads",
                           "-c", str(sum(b.threads.values())), "-n", node, "--loglevel=WARNING",
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
    with b.namespace("costs") as client:
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
    ap.add_argument("--pool", choices=sorted(POOLS), default="saturated", help="pool shape preset (flags override)")
    ap.add_argument("--policies", default=None, help="comma-separated: vanilla, static:N, reserve, preempt, preempt:K")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    ap.add_argument("--backlog", type=int, default=None, help="batch runs queued before the loaded window")
    ap.add_argument("--rate", type=float, default=None, help="interactive runs per second")
    ap.add_argument("--tight-deadline", type=float, default=0.8, help="deadline of the burst's interactive runs")
    shape = ap.add_argument_group("pool shape")
    shape.add_argument("--replicas", type=int, default=1, help="Triton replicas to start")
    shape.add_argument("--max-seqs", type=int, default=None, help="each replica's most sequences at once")
    shape.add_argument("--load-factor", type=float, default=None, help="slow-down of a decode step per extra sequence")
    shape.add_argument("--tokens", type=int, default=None, help="tokens per model call")
    shape.add_argument("--interactive-threads", type=int, default=None)
    shape.add_argument("--shared-threads", type=int, default=None)
    more = ap.add_argument_group("other measurements (instead of the policies)")
    more.add_argument("--scaling", action="store_true", help="batch throughput: one replica vs --replicas")
    more.add_argument("--kill", action="store_true", help="a replica killed under load and started again")
    more.add_argument("--long-tokens", type=int, default=64, help="tokens per call of --scaling and --kill batch runs")
    more.add_argument("--kill-backlog", type=int, default=400)
    more.add_argument("--costs", action="store_true", help="orchestration cost and perf_analyzer comparison")
    ap.add_argument("--quick", action="store_true", help="10 s windows, a backlog of 1000")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    for key, value in POOLS[args.pool].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.quick:
        args.window, args.backlog = 10.0, min(args.backlog, 1000)
    if (args.scaling or args.kill) and args.replicas < 2:
        raise SystemExit("--scaling and --kill need --replicas 2 or more")

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    procs = launch.Processes(root / "logs")
    started = time.time()
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        repo = launch.sim_repository(root / "models", **TIMING, load_factor=args.load_factor,
                                     max_num_seqs=args.max_seqs)
        launch.sim_repository(repo, name="medium_zero", **ZERO)
        replicas = []
        for i in range(args.replicas):
            ports = (launch.free_port(), launch.free_port(), launch.free_port())
            ep = launch.start_triton(procs, root / f"triton-{i}", ["medium_sim", "medium_zero"], name=f"triton-{i}",
                                     repository=repo, ports=ports)
            replicas.append(Replica(f"triton-{i}", ep, ports))
        agents_dir = root / "agents"
        agents_dir.mkdir()
        for name, text in {"bench_interactive": agent_toml("bench_interactive", "a person waits", args.tokens),
                           "bench_batch": agent_toml("bench_batch", "a script waits", args.tokens),
                           "bench_batch_long": agent_toml("bench_batch_long", "a long batch call", args.long_tokens),
                           "bench_chain": chain_toml()}.items():
            (agents_dir / f"{name}.toml").write_text(text)
        b = Bench(root, redis_url, replicas, procs, agents_dir, repo,
                  {"interactive_only": args.interactive_threads, "shared": args.shared_threads})
        # The dev model's timing as the server loaded it (its config, read back from Triton).
        served = launch.http_json(f"http://{b.triton.http_url}/v2/models/medium_sim/config")
        b.ran["model"] = {k: v["string_value"] for k, v in served.get("parameters", {}).items()}
        sections: list[str] = []
        if args.scaling:
            print("scaling: one replica, then all ...", file=sys.stderr)
            one = scenario_drain(b, "one replica", {"FLEET_BATCH_POLICY": "preempt"}, args.kill_backlog * 4, args.window)
            many = scenario_drain(b, f"{args.replicas} replicas", {
                "FLEET_BATCH_POLICY": "preempt", "FLEET_TRITON_REPLICAS": b.replica_env(args.replicas)},
                args.kill_backlog * 4, args.window)
            sections.append(render_scaling(args, b.ran, one, many))
        if args.kill:
            print("a replica killed under load ...", file=sys.stderr)
            sections.append(render_kill(args, b.ran, scenario_kill(b, args)))
        if args.costs:
            print("orchestration cost ...", file=sys.stderr)
            orch = orchestration(b, sequential=20 if args.quick else 50, concurrent=50 if args.quick else 200)
            print("llm-step throughput vs perf_analyzer ...", file=sys.stderr)
            conc = 8
            fleet_tput = fleet_llm_throughput(b, conc, args.window / 1.5)
            pa_tput = perf_analyzer_throughput(b, conc, args.window / 3)
            sections.append(render_costs(orch, fleet_tput, pa_tput, conc))
        if not sections:
            rows = []
            for spec in args.policies.split(","):
                label, extra = policy_env(spec)
                shared_only = spec.endswith("/shared")
                label += ", every thread shared" if shared_only else ""
                print(f"{label}: idle, then backlog, then a burst ...", file=sys.stderr)
                rows.append((label, scenario_policy(b, label, extra, args, shared_only)))
            sections.append(render_policies(args, b.ran, rows))
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)

    report = "\n".join([*_header(args, b.ran, time.time() - started), "", *sections])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


def _command(args) -> str:  # noqa: ANN001
    """The command line that reproduces this run, every pool setting spelled out."""
    parts = ["python ops/bench/scheduling.py", f"--pool {args.pool}", "--quick" if args.quick else "",
             f"--window {args.window:g}", f"--backlog {args.backlog}", f"--rate {args.rate:g}",
             f"--tight-deadline {args.tight_deadline:g}", f"--replicas {args.replicas}", f"--max-seqs {args.max_seqs}",
             f"--load-factor {args.load_factor:g}", f"--tokens {args.tokens}",
             f"--interactive-threads {args.interactive_threads}", f"--shared-threads {args.shared_threads}"]
    if args.scaling or args.kill:
        parts += ["--scaling" if args.scaling else "", "--kill" if args.kill else "",
                  f"--long-tokens {args.long_tokens}", f"--kill-backlog {args.kill_backlog}"]
    if args.costs:
        parts.append("--costs")
    if not (args.scaling or args.kill or args.costs):
        parts.append(f"--policies {args.policies}")
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(p for p in parts if p)


def _workers(ran: dict, label: str) -> str:
    """The inference workers a configuration ran, as the report states them."""
    return " + ".join(f"{name} ({classes}, {threads} threads)" for name, classes, threads in ran[label]["workers"])


def _header(args, ran: dict, elapsed: float) -> list[str]:  # noqa: ANN001
    """Command, machine and model lines every report starts with."""
    m = ran["model"]
    return ["# Scheduling benchmark", "",
            *provenance(elapsed, _command(args)),
            f"Dev model on each of {args.replicas} Triton replica(s), its config as Triton loaded it: "
            f"ttft {m['ttft_ms']} ms, prefill {m['prefill_ms_per_token']} ms/token, {m['tpot_ms']} ms/token, "
            f"load factor {m['load_factor']}, max {m['max_num_seqs']} sequences."]


def _policy_cell(ran: dict) -> str:
    if ran["scheduling"] == "vanilla":
        return "none (Celery defaults)"
    pool = ", ".join(f"{p['name']}: capacity {p['capacity']}" + (f", pipeline {p['pipeline']} at the end"
                                                                if ran["policy"] == "preempt" else "")
                     for p in ran.get("pool", []))
    detail = {"static": f"batch cap {ran['batch_inflight_max']} per replica",
              "reserve": f"reserve >= {ran['reserve_min']} + recent interactive peak",
              "preempt": f"pipeline max {ran['pipeline_max']}, up to {ran['preempt_victims']} preempted per "
                         "interactive arrival"}[ran["policy"]]
    return f"{ran['policy']}: {detail} ({pool})"


def render_policies(args, ran: dict, rows: list) -> str:  # noqa: ANN001
    vanilla = next((r for label, r in rows if ran[label]["scheduling"] == "vanilla"), None)
    base = vanilla["batch_per_s"] if vanilla else float("nan")
    lines = [f"## Batch policies on one pool ({args.pool})", "",
             "Each configuration in its own namespace with the same number of worker threads: "
             + "; ".join(f"{label}: {_workers(ran, label)}" for label, _ in rows) + ".",
             f"Interactive runs (one model call of {args.tokens} tokens, streamed) at {args.rate:g}/s for "
             f"{args.window:g} s, idle and then while a backlog of {args.backlog} batch runs drains; then a burst of "
             f"{BURST} interactive runs at once with a {args.tight_deadline:g} s deadline.", "",
             "| configuration | scheduling as it ran | TTFT p50 / p99 idle | TTFT p50 / p99 under backlog "
             "| run p50 / p99 idle | run p50 / p99 under backlog | p99 under backlog / idle | batch runs/s "
             "| batch vs vanilla | interactive requests that waited in the engine | batch requests preempted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        i, l = r["idle"], r["loaded"]
        preempted = sum(p["preempted"] for p in ran[label].get("pool", []))
        lines.append(
            f"| {label} | {_policy_cell(ran[label])} | {i['ttft_p50']:.3f} / {i['ttft_p99']:.3f} "
            f"| {l['ttft_p50']:.3f} / {l['ttft_p99']:.3f} | {i['p50']:.3f} / {i['p99']:.3f} "
            f"| {l['p50']:.3f} / {l['p99']:.3f} | {l['p99'] / i['p99']:.2f} | {r['batch_per_s']:.1f} "
            f"| {r['batch_per_s'] / base:.2f} | {r['interactive_waited']:.0f} of {r['interactive_requests']} "
            f"| {preempted} |")
    lines += ["", f"Burst of {BURST} interactive runs with a {args.tight_deadline:g} s deadline, under the backlog "
              "(goodput: runs that finished within their deadline):", "",
              "| configuration | admitted | met their deadline | share of admitted | refused at once "
              "| Retry-After (s) | goodput |", "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        bu = r["burst"]
        share = bu["met"] / bu["admitted"] if bu["admitted"] else float("nan")
        retry = "-" if not bu["retry_after_s"] else f"{bu['retry_after_s'][0]:.1f} to {bu['retry_after_s'][1]:.1f}"
        lines.append(f"| {label} | {bu['admitted']} | {bu['met']} | {share:.0%} | {bu['refused']} | {retry} "
                     f"| {bu['met']} |")
    refused = {label: r["refused"] for label, r in rows if r["refused"]}
    if refused:
        lines += ["", "Interactive runs refused at admission during the steady windows: "
                  + ", ".join(f"{k}: {v}" for k, v in refused.items()) + "."]
    return "\n".join(lines) + "\n"


def render_scaling(args, ran: dict, one: float, many: float) -> str:  # noqa: ANN001
    return "\n".join([
        "## Replicas: batch throughput", "",
        f"The fleet (preempt) draining batch runs of {args.long_tokens} tokens per call alone, over {args.window:g} s; "
        f"workers: {_workers(ran, 'one replica')}. One replica: {', '.join(ran['one replica']['replicas'])}; "
        f"then {', '.join(ran[f'{args.replicas} replicas']['replicas'])}.", "",
        "| replicas | batch runs/s |", "|---|---|",
        f"| 1 | {one:.1f} |", f"| {args.replicas} | {many:.1f} |", "",
        f"{args.replicas} replicas / one: **{many / one:.2f}** (target >= {0.9 * args.replicas:.1f}).", ""])


def render_kill(args, ran: dict, k: dict) -> str:  # noqa: ANN001
    return "\n".join([
        "## A replica killed under load", "",
        f"{len(ran['kill']['replicas'])} replicas ({', '.join(ran['kill']['replicas'])}); {k['batch']} batch runs of "
        f"{args.long_tokens} tokens and interactive runs at {args.rate:g}/s for {args.window:g} s. After "
        f"{args.window / 3:.0f} s the last replica is killed (SIGKILL) with {k['inflight_at_kill']['interactive']} "
        f"interactive and {k['inflight_at_kill']['batch']} batch requests in flight there, and started again "
        f"{k['down_s']:.0f} s later.", "",
        "| runs | completed | expired | dead-lettered | lost | refused at admission |", "|---|---|---|---|---|---|",
        f"| {k['batch']} batch + {k['interactive']} interactive | {k['completed']} | {k['expired']} "
        f"| {k['dead_lettered']} | **{k['lost']}** | {k['refused']} |", "",
        f"While it was down the fleet saw it {k['down_state']} ({k['down_reason'] or 'no reason recorded'}); the pool's "
        f"capacity for admission was {k['capacity_while_down']} sequences, and {k['capacity_after']} after it came "
        f"back. Model calls served by the returned replica: {k['served_after_return']}.", ""])


def render_costs(orch: dict, fleet_tput: float, pa_tput: float | None, conc: int) -> str:
    seq_ratio = orch["fleet_seq_s"] / orch["celery_seq_s"]
    par_ratio = orch["fleet_par_s"] / orch["celery_par_s"]
    pa = f"{pa_tput:.1f}" if pa_tput else "n/a"
    pa_ratio = f"{fleet_tput / pa_tput:.2f}" if pa_tput else "n/a"
    return "\n".join([
        "## Orchestration cost", "",
        "| measure | value | target |", "|---|---|---|",
        f"| fleet run of {CHAIN_STEPS} steps / Celery chain of {CHAIN_STEPS} no-ops, one at a time "
        f"| {seq_ratio:.2f} ({orch['fleet_seq_s'] * 1000:.0f} / {orch['celery_seq_s'] * 1000:.0f} ms) | <= 1.0 |",
        f"| same, many at once | {par_ratio:.2f} ({orch['fleet_par_s']:.1f} / {orch['celery_par_s']:.1f} s) | <= 1.0 |",
        f"| llm-step throughput: fleet / perf_analyzer at concurrency {conc} | {pa_ratio} "
        f"({fleet_tput:.1f} / {pa} per s) | >= 0.9 |", ""])


if __name__ == "__main__":
    sys.exit(main())
