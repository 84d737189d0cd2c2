"""Latency objectives against a real Triton: the pool monitor learns from the engine's own TTFT and
TPOT histograms how its latencies grow with running sequences, and sets the occupancy at which
batch stops taking slots; a tighter objective lowers it, a relaxed one raises it again."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from fleet.connections import redis_client
from fleet.inference.monitor import PoolMonitor
from fleet.inference.replicas import ReplicaBoard
from fleet.inference.triton import TritonClient
from fleet.ops import launch
from fleet.ops.status import objectives

from .conftest import TritonInfo, make_settings

pytestmark = pytest.mark.integration

#: Each running sequence slows a step by a quarter of its idle time: occupancy matters a lot.
STEEP_SIM = {"ttft_ms": 20, "prefill_ms_per_token": 0.05, "tpot_ms": 4, "load_factor": 0.25, "max_num_seqs": 32}


@pytest.fixture(scope="module")
def steep_triton(session_dir):
    root = session_dir / f"steep-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    try:
        repo = launch.sim_repository(root / "models", **STEEP_SIM)
        ep = launch.start_triton(procs, root / "triton", ["medium_sim"], repository=repo)
        yield TritonInfo(ep.grpc_url, ep.http_url, ep.metrics_url, dict(STEEP_SIM))
    finally:
        procs.stop()


def load_at(triton: TritonInfo, levels: list[int], seconds: float, tick) -> None:  # noqa: ANN001
    """Keep each number of requests running at the engine in turn for ``seconds``, calling ``tick``."""
    client = TritonClient(triton.grpc_url)
    try:
        for level in levels:
            stop = threading.Event()

            def loop(k: int) -> None:
                while not stop.is_set():
                    client.generate(f"load {level} {k} {time.monotonic()}", {"max_tokens": 30}, model="medium_sim",
                                    priority=2, timeout_s=30)

            threads = [threading.Thread(target=loop, args=(k,)) for k in range(level)]
            for t in threads:
                t.start()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                tick()
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join()
    finally:
        client.close()


def test_the_batch_occupancy_falls_with_a_tighter_objective_and_rises_when_it_is_relaxed(redis_url, steep_triton):
    replica = f'[{{"name": "steep", "grpc_url": "{steep_triton.grpc_url}", "metrics_url": "{steep_triton.metrics_url}"}}]'
    settings, _ = make_settings(redis_url, steep_triton, f"o{uuid.uuid4().hex[:8]}", triton_replicas=replica,
                                objective_tpot_p99_s=1.0, objective_halflife_s=60)
    client = redis_client(settings)
    monitor = PoolMonitor(settings, client, lambda _name: TritonClient(steep_triton.grpc_url))
    board = ReplicaBoard(settings, client)
    monitor.tick()  # probes the replica: up, capacity 32
    load_at(steep_triton, [2, 12, 4, 20, 8], 1.5, monitor.tick)

    model = monitor.learners["steep"].model("tpot")
    assert model is not None and model.b > 0, model  # each running sequence slows the step
    # steps take 4 ms * (1 + 0.25 (n - 1)) plus the simulator's own overhead: 1 ms more per sequence
    assert 0.0005 <= model.b <= 0.004, model

    def limit_with(target: float) -> int | None:
        monitor.settings = settings.model_copy(update={"objective_tpot_p99_s": target})
        monitor.tick()
        return board.states()[0].batch_limit

    loose = model.p99(24) / settings.objective_margin  # objectives between what 4 and 24 sequences take
    tight = model.p99(4) / settings.objective_margin
    limits = [limit_with(loose), limit_with(tight), limit_with(loose), limit_with(10.0)]
    assert limits[0] is not None and limits[1] is not None
    assert limits[1] < limits[0]  # tighter: batch stops sooner
    assert limits[2] > limits[1]  # relaxed again: it rises
    assert limits[3] is None  # an objective every occupancy holds: no limit at all
    state = board.states()[0]
    shown = objectives(monitor.settings, [state])["tpot_p99_s"]
    assert shown["objective"] == 10.0 and shown["measured"] > 0  # fleet status: objective beside measured

    monitor.settings = settings.model_copy(update={"objective_tpot_p99_s": None})
    monitor.tick()
    assert board.states()[0].batch_limit is None  # no objective: today's behaviour
