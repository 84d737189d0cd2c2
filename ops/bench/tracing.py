"""Benchmark: what tracing costs a step, tracing off and on side by side in one run.

Starts its own Redis, two Tritons serving a zero-latency dev model (one in Triton's
OpenTelemetry trace mode, for the traced fleet), a local OTLP receiver that takes the spans
and drops them, and two fleet namespaces with real worker processes: one whose workers
trace (``OTEL_EXPORTER_OTLP_ENDPOINT`` set), one whose workers do not. Every run is the same
10-step agent (5 one-token model calls, 5 tool calls). Prints a Markdown report:

- per step, one run at a time: run latency / steps, an untraced and a traced run in turn,
  so that each pair meets the machine in the same state (a shared 2-core machine drifts
  more than tracing costs); the median of the pairs' differences;
- per step, many runs at once: wall time / steps;
- worker CPU per step: CPU seconds of the worker processes (and their pool children) / steps,
  and Triton's (its server and python backend) likewise;
- in process: the tracing calls one step makes (fleet.core.tracing, as the task, the hooks,
  the model call and the next publish make them), off and on, sending the spans included.

    python ops/bench/tracing.py --out ops/bench/results/tracing.md
    python ops/bench/tracing.py --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops" / "bench"))

from common import provenance  # noqa: E402

from fleet.broker.queues import worker_queues  # noqa: E402
from fleet.core import tracing  # noqa: E402
from fleet.inference.replicas import ReplicaBoard  # noqa: E402
from fleet.inference.triton import Generation  # noqa: E402
from fleet.ops import launch  # noqa: E402
from fleet.settings import Settings  # noqa: E402
from fleet.surfaces.client import FleetClient  # noqa: E402

ZERO = {"ttft_ms": 0, "prefill_ms_per_token": 0, "tpot_ms": 0, "load_factor": 0, "max_num_seqs": 256}
STEPS = 10
AGENT = "\n".join(
    ['name = "bench_trace"', 'description = "Five one-token model calls and five tool calls."',
     f'result = "s{STEPS - 1}"', "[inputs.text]", 'type = "string"', "[example]", 'text = "hi"']
    + [(f'[[steps]]\nname = "s{i}"\nkind = "llm"\nmodel = "medium_zero"\nprompt = "{{input.text}} {i}"\nmax_tokens = 1'
        if i % 2 == 0 else f'[[steps]]\nname = "s{i}"\nkind = "tool"\ntool = "word_count"\ninput = "{{input.text}} {i}"')
       for i in range(STEPS)]
)


class Sink:
    """An OTLP/HTTP endpoint that accepts spans and drops them (a collector elsewhere)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Mode:
    """One side of the comparison: a namespace, its workers, and what was measured."""

    name: str
    settings: Settings
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)
    triton_pid: int = 0
    one: list[float] = field(default_factory=list)  # ms per step of each run, one run at a time
    many: list[float] = field(default_factory=list)  # ms of wall time per step, many runs at once (per round)
    cpu: list[float] = field(default_factory=list)  # worker CPU ms per step (per round)
    triton_cpu: list[float] = field(default_factory=list)  # Triton's CPU ms per step (per round)


def _settings(env: dict[str, str]) -> Settings:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings(_env_file=None)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _mode(name: str, redis_url: str, triton: launch.TritonEndpoints, agents_dir: Path, otel: dict[str, str]) -> Mode:
    prefix = f"bt{uuid.uuid4().hex[:6]}"
    env = {"FLEET_REDIS_URL": redis_url, "FLEET_KEY_PREFIX": prefix, "FLEET_QUEUE_PREFIX": f"{prefix}.",
           "FLEET_TRITON_GRPC_URL": triton.grpc_url, "FLEET_TRITON_HTTP_URL": triton.http_url,
           "FLEET_TRITON_METRICS_URL": triton.metrics_url, "FLEET_TRITON_MODEL": "medium_zero",
           "FLEET_AGENTS_DIR": str(agents_dir), "FLEET_LOG_LEVEL": "WARNING"}
    return Mode(name, _settings(env), {**env, **otel})


def _start_workers(procs: launch.Processes, mode: Mode, client: FleetClient, threads: int) -> None:
    nodes = []
    for kind, pool, concurrency in (("llm", "threads", threads), ("tool", "prefork", 2)):
        node = f"{mode.name}-{kind}-{uuid.uuid4().hex[:4]}@bench"
        launch.start_worker(procs, f"{mode.name}-{kind}", worker_queues(mode.settings, kind), pool, concurrency,
                            mode.env, node=node, loglevel="WARNING")
        nodes.append(node)
    for node in nodes:
        launch.wait_until(lambda n=node: launch.worker_answers(client.app, n), 60, node, None, 0.3)
    # Admission takes runs once the workers have found the mode's Triton up.
    board = ReplicaBoard(mode.settings, client.store.redis)
    launch.wait_until(lambda: any(st.up for st in board.states()), 60, f"{mode.name}: Triton up", None, 0.2)
    mode.pids = [procs.children[f"{mode.name}-{kind}"].pid for kind in ("llm", "tool")]


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def _one(client: FleetClient, text: str) -> float:
    run = client.wait(client.submit("bench_trace", {"text": text}), timeout=60)
    assert run.status == "succeeded", run.error
    return run.latency_s / STEPS * 1000


def _many(client: FleetClient, n: int, tag: str) -> float:
    t0 = time.perf_counter()
    ids = [client.submit("bench_trace", {"text": f"{tag} {i}"}, priority="batch") for i in range(n)]
    assert all(client.wait(r, timeout=120).status == "succeeded" for r in ids)
    return (time.perf_counter() - t0) / (n * STEPS) * 1000


def _round(modes: list[Mode], clients: dict[str, FleetClient], r: int, sequential: int, concurrent: int) -> None:
    """One round: runs one at a time, off and on in turn (so each pair shares the machine's
    moment), then a batch of runs at once per mode; the worker CPU each mode used."""
    cpu0 = {m.name: (_cpu_s(m.pids), _cpu_s([m.triton_pid])) for m in modes}
    for i in range(sequential):
        for mode in (modes if (r + i) % 2 == 0 else modes[::-1]):
            mode.one.append(_one(clients[mode.name], f"one {r} {i}"))
    for mode in (modes if r % 2 == 0 else modes[::-1]):
        mode.many.append(_many(clients[mode.name], concurrent, f"many {r}"))
    steps = (sequential + concurrent) * STEPS
    for mode in modes:
        mode.cpu.append((_cpu_s(mode.pids) - cpu0[mode.name][0]) / steps * 1000)
        mode.triton_cpu.append((_cpu_s([mode.triton_pid]) - cpu0[mode.name][1]) / steps * 1000)


def _step_calls(n: int) -> float:
    """Microseconds per step of the tracing calls one step makes (see the module docstring),
    sending the spans included (the time to flush them is counted)."""
    gen = Generation(text="x", tokens_in=3, tokens_out=1, finish_reason="length", ttft_s=0.001, duration_s=0.002)
    headers: dict = {}
    t0 = time.perf_counter()
    for _ in range(n):
        with tracing.delivery("bench.s0", headers.get, time.time(), {"fleet.run_id": "r", "fleet.step": "s0"}):
            tracing.current_span().set_attributes({"fleet.agent": "bench", "fleet.priority": "batch",
                                                   "fleet.attempt": 1})
            with tracing.model_call("medium_zero", 1) as span:
                tracing.grpc_metadata()
                tracing.model_result(span, gen.tokens_in, gen.tokens_out, gen.finish_reason, gen.ttft_s)
            nxt: dict = {}
            tracing.inject_message(nxt)
        headers = nxt
    tracing.flush(timeout_s=60)
    return (time.perf_counter() - t0) / n * 1e6


def _micro(sink: Sink, n: int) -> tuple[float, float]:
    tracing.shutdown()
    off = _step_calls(n)
    # Steps back to back make spans faster than any worker does: a queue that holds them all,
    # so that none is dropped and every one is sent (and counted).
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_MAX_QUEUE_SIZE": str(4 * n)}
    os.environ.update(env)
    try:
        tracing.shutdown()
        tracing.configure(Settings(_env_file=None), "bench")
        _step_calls(200)  # warm: the exporter's connection
        on = _step_calls(n)
    finally:
        for name in env:
            os.environ.pop(name, None)
        tracing.shutdown()
    return off, on


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of off then on")
    ap.add_argument("--sequential", type=int, default=30, help="runs one at a time, per round and mode")
    ap.add_argument("--concurrent", type=int, default=50, help="runs at once, per round and mode")
    ap.add_argument("--threads", type=int, default=8, help="inference worker threads")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 10 + 20 runs")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.sequential, args.concurrent = 2, 10, 20

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-tracing-"))
    procs = launch.Processes(root / "logs")
    sink = Sink()
    started = time.time()
    try:
        redis_url = launch.start_redis(procs, root / "redis")
        repo = launch.sim_repository(root / "models", name="medium_zero", **ZERO)
        plain = launch.start_triton(procs, root / "triton-plain", ["medium_zero"], name="triton-plain",
                                    repository=repo)
        traced = launch.start_triton(procs, root / "triton-traced", ["medium_zero"], name="triton-traced",
                                     repository=repo, trace=launch.triton_trace_args(f"{sink.endpoint}/v1/traces"))
        agents_dir = root / "agents"
        agents_dir.mkdir()
        (agents_dir / "bench_trace.toml").write_text(AGENT)
        modes = [_mode("off", redis_url, plain, agents_dir, {}),
                 _mode("on", redis_url, traced, agents_dir, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint})]
        modes[0].triton_pid, modes[1].triton_pid = procs.children["triton-plain"].pid, procs.children["triton-traced"].pid
        # This process submits untraced for both: its one span a run is not a step's cost, and
        # one process cannot trace for one mode and not the other run by run.
        tracing.shutdown()
        clients = {m.name: FleetClient(m.settings) for m in modes}
        try:
            for mode in modes:
                _start_workers(procs, mode, clients[mode.name], args.threads)
                for _ in range(3):  # warm: connections, model metadata
                    _one(clients[mode.name], "warm")
            for r in range(args.rounds):
                print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
                _round(modes, clients, r, args.sequential, args.concurrent)
        finally:
            for client in clients.values():
                client.close()
        print("in process ...", file=sys.stderr)
        micro = _micro(sink, 5_000)
    finally:
        procs.stop()
        sink.close()
        shutil.rmtree(root, ignore_errors=True)

    report = render(args, modes, micro, sink, time.time() - started)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


def render(args, modes: list[Mode], micro: tuple[float, float], sink: Sink, elapsed: float) -> str:  # noqa: ANN001
    off, on = modes
    med = statistics.median
    paired = [b - a for a, b in zip(off.one, on.one)]  # the same moment of the machine for both
    q1, _, q3 = statistics.quantiles(paired, n=4)
    command = (f"python ops/bench/tracing.py --rounds {args.rounds} --sequential {args.sequential} "
               f"--concurrent {args.concurrent} --threads {args.threads}"
               + (f" --out {args.out}" if args.out else ""))
    lines = [
        "# What tracing costs a step", "",
        *provenance(elapsed, command),
        f"Each run: {STEPS} steps (5 one-token model calls on a zero-latency dev model, 5 tool calls); per mode "
        f"an inference worker of {args.threads} threads and a tool worker of 2 processes. Tracing on: the workers "
        "export to a local OTLP receiver and Triton runs in its OpenTelemetry trace mode "
        f"({sink.requests} exports, {sink.bytes / 1e6:.1f} MB of spans received); the submitting client is "
        f"untraced for both. {args.rounds} rounds; in each, {args.sequential} runs per mode one at a time, off "
        f"and on in turn, then {args.concurrent} runs at once per mode.", "",
        "## Per step", "",
        "| measure | tracing off | tracing on | on - off |", "|---|---|---|---|",
        f"| per step, one run at a time: median over {len(off.one)} runs (ms) | {med(off.one):.3f} | "
        f"{med(on.one):.3f} | {med(paired):+.3f} (median of run pairs; quartiles {q1:+.3f} / {q3:+.3f}) |",
        f"| per step, {args.concurrent} runs at once: median over rounds (ms of wall time) | {med(off.many):.3f} | "
        f"{med(on.many):.3f} | {med(on.many) - med(off.many):+.3f} |",
        f"| worker CPU per step: median over rounds (ms) | {med(off.cpu):.3f} | {med(on.cpu):.3f} | "
        f"{med(on.cpu) - med(off.cpu):+.3f} |",
        f"| Triton's CPU per step (its python backend included): median over rounds (ms) | {med(off.triton_cpu):.3f} | "
        f"{med(on.triton_cpu):.3f} | {med(on.triton_cpu) - med(off.triton_cpu):+.3f} |",
        f"| in process: the tracing calls of one step, sending included (ms) | {micro[0] / 1000:.4f} | "
        f"{micro[1] / 1000:.4f} | {(micro[1] - micro[0]) / 1000:+.4f} |",
        "", "Target: tracing on adds at most 0.5 ms per step.", "", "## Rounds", "",
        "| round | off: many at once ms/step | on: many at once ms/step | off: worker CPU ms/step | "
        "on: worker CPU ms/step |", "|---|---|---|---|---|",
    ]
    for i in range(args.rounds):
        lines.append(f"| {i + 1} | {off.many[i]:.3f} | {on.many[i]:.3f} | {off.cpu[i]:.3f} | {on.cpu[i]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
