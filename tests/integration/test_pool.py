"""The inference pool over two real Triton replicas: per-replica capacity as the model counts
it, preemption of batch requests for interactive ones, a replica lost under load and its
return, admission from the pool's capacity.

This module runs its own two Triton servers (four sequences each, a time to first token
long enough that a preempted request has left the engine before the request that took its
slot can start), so that killing one disturbs no other test.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.errors import Overloaded
from fleet.inference.replicas import ReplicaBoard
from fleet.ops import launch
from fleet.scheduling.capacity import Capacity
from fleet.scheduling.forecast import Forecaster

from .conftest import TEST_AGENTS_AND_TOOLS, Fleet, TritonInfo, close_fleet, make_settings, tally

pytestmark = pytest.mark.integration

CAPACITY = 4
POOL_SIM = {"ttft_ms": 100, "prefill_ms_per_token": 0.05, "tpot_ms": 8, "load_factor": 0.02,
            "max_num_seqs": CAPACITY}


@dataclass
class Replicas:
    """Two Triton servers on fixed ports, which tests may kill and start again."""

    root: Path
    procs: launch.Processes
    repo: Path
    ports: list[tuple[int, int, int]] = field(default_factory=list)
    endpoints: list[launch.TritonEndpoints] = field(default_factory=list)

    def start(self, i: int) -> None:
        ep = launch.start_triton(self.procs, self.root / f"r{i}", ["medium_sim"], name=f"r{i}",
                                 repository=self.repo, ports=self.ports[i])
        if i < len(self.endpoints):
            self.endpoints[i] = ep
        else:
            self.endpoints.append(ep)

    def kill(self, i: int) -> None:
        self.procs.stop(f"r{i}", sig=signal.SIGKILL)

    def setting(self, n: int = 2) -> str:
        return json.dumps([{"name": f"r{i}", "grpc_url": ep.grpc_url, "metrics_url": ep.metrics_url}
                           for i, ep in enumerate(self.endpoints[:n])])

    def model_counters(self, i: int) -> dict[str, float]:
        """The dev model's own counters on replica ``i`` (``{stream}`` marks streamed requests)."""
        text = urllib.request.urlopen(self.endpoints[i].metrics_url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("medium_sim:", "vllm:")) and 'model="medium_sim"' in line:
                name = line.split("{")[0] + ("{stream}" if 'stream="true"' in line else "")
                out[name] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def replicas(session_dir):
    root = session_dir / f"pool-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    pair = Replicas(root, procs, launch.sim_repository(root / "models", **POOL_SIM))
    try:
        for i in range(2):
            pair.ports.append((launch.free_port(), launch.free_port(), launch.free_port()))
            pair.start(i)
        yield pair
    finally:
        procs.stop()


def pool_fleet(redis_url: str, pair: Replicas, session_dir: Path, n: int = 2, **overrides: object) -> Fleet:
    """A fleet namespace over ``n`` of the replicas, with an interactive-only and a shared
    inference worker (more shared threads than the pool has sequences) and a tool worker."""
    prefix = f"q{uuid.uuid4().hex[:8]}"
    first = pair.endpoints[0]
    settings, env = make_settings(redis_url, TritonInfo(first.grpc_url, first.http_url), prefix,
                                  triton_replicas=pair.setting(n), **{**TEST_AGENTS_AND_TOOLS, **overrides})
    from fleet.surfaces.client import FleetClient

    f = Fleet(settings, env, launch.Processes(session_dir / "logs" / prefix), FleetClient(settings))
    f.start_worker("interactive", "llm", "threads", CAPACITY, classes=("interactive",))
    f.start_worker("shared", "llm", "threads", 3 * CAPACITY * n)
    return f


def wait_for(check, what: str, timeout_s: float = 30.0) -> None:
    """Poll ``check`` (the pool's state in Redis, which no event announces) until it is true."""
    launch.wait_until(check, timeout_s, what, None, 0.05)


def board(f: Fleet) -> dict[str, object]:
    return {s.name: s for s in ReplicaBoard(f.settings, f.client.store.redis).states()}


@dataclass
class FullPool:
    """What happened when interactive runs arrived at a pool full of batch runs."""

    fleet: Fleet
    batch: list[str]
    interactive: list[str]
    before: list[dict[str, float]]
    after: list[dict[str, float]]
    replicas: dict


@pytest.fixture(scope="module")
def full_pool(redis_url, replicas, session_dir):
    """Batch runs fill both replicas, then interactive runs arrive; nothing is sent beyond a
    replica's capacity (FLEET_PIPELINE_MAX=0), so no request should ever wait inside an engine."""
    f = pool_fleet(redis_url, replicas, session_dir, pipeline_max=0)
    try:
        before = [replicas.model_counters(i) for i in range(2)]
        batch = [f.client.submit("oneshot", {"topic": f"backlog {i}"}, priority="batch") for i in range(40)]
        wait_for(lambda: all(s.inflight["batch"] == CAPACITY for s in board(f).values()), "a full pool")
        interactive = []
        for i in range(6):
            interactive.append(f.client.submit("oneshot", {"topic": f"person {i}"}))
            time.sleep(0.05)  # people arriving one after another, not at once
        counts = tally(f.client, batch + interactive, timeout=120)
        assert counts["completed"] == len(batch) + len(interactive), counts
        after = [replicas.model_counters(i) for i in range(2)]
        yield FullPool(f, batch, interactive, before, after, board(f))
    finally:
        close_fleet(f)


def test_no_replica_ever_runs_or_queues_more_than_its_capacity_and_both_serve(full_pool):
    p = full_pool
    preempted = sum(s.preempted for s in p.replicas.values())
    for i, (before, after) in enumerate(zip(p.before, p.after)):
        served = after["vllm:request_success_total"] - before.get("vllm:request_success_total", 0)
        waited = sum(after.get(k, 0) - before.get(k, 0)
                     for k in ("medium_sim:slot_waits_total", "medium_sim:slot_waits_total{stream}"))
        # Counted by the model itself: it never had a request ready to run without a free slot.
        assert (f"r{i}", waited) == (f"r{i}", 0)
        assert after["medium_sim:num_requests_running_max"] <= CAPACITY
        assert served >= 10  # both replicas took their share
    assert preempted > 0  # interactive runs did arrive at a full pool
    assert all(s.peak["batch"] <= CAPACITY and s.inflight == {"interactive": 0, "batch": 0}
               for s in p.replicas.values())


def test_interactive_runs_at_a_full_pool_take_the_youngest_batch_slots(full_pool):
    p = full_pool
    client = p.fleet.client
    interactive = [client.get(r) for r in p.interactive]
    batch = [client.get(r) for r in p.batch]
    assert all(s.preemptions == 0 for r in interactive for s in r.steps)  # interactive is never preempted
    preempted = [r for r in batch if r.steps[0].preemptions]
    assert preempted  # some batch model calls gave up their slot
    # Each interactive run started before the batch runs it overtook finished.
    first_person = min(r.created_at for r in interactive)
    overtaken = [r for r in preempted if r.finished_at > max(x.finished_at for x in interactive)]
    assert overtaken and all(r.created_at < first_person for r in overtaken)


def test_a_preempted_batch_step_returns_what_an_unpreempted_one_returns_and_commits_once(full_pool):
    p = full_pool
    client = p.fleet.client
    preempted = [client.get(r) for r in p.batch if client.get(r).steps[0].preemptions]
    assert preempted
    for run in preempted:
        step = run.steps[0]
        assert step.attempts == 1  # a preemption spends no attempt
        done = [e for _, e in client.store.redis.xrange(client.store.events_key(run.id))
                if e["type"] == "step" and e.get("status") == "done"]
        assert len(done) == 1  # committed once
    # The same inputs again, on a pool with nothing to preempt them for.
    again = [client.submit("oneshot", dict(r.input), priority="batch") for r in preempted]
    rerun = [client.wait(r, timeout=60) for r in again]
    assert all(r.steps[0].preemptions == 0 for r in rerun)
    assert [r.result for r in rerun] == [r.result for r in preempted]
    assert all(len(r.result.split()) == 24 for r in preempted)


def test_a_replica_lost_under_load_loses_no_run_tightens_admission_and_rejoins(
        redis_url, replicas, session_dir, reliability_report):
    f = pool_fleet(redis_url, replicas, session_dir)
    try:
        ids = [f.client.submit("oneshot", {"topic": f"before the loss {i}"}, priority="batch") for i in range(40)]
        ids += [f.client.submit("oneshot", {"topic": f"person {i}"}) for i in range(4)]
        wait_for(lambda: board(f)["r1"].inflight["batch"] > 0, "work at the replica to lose")
        at_kill = board(f)["r1"].inflight
        replicas.kill(1)
        wait_for(lambda: not board(f)["r1"].up, "the fleet seeing the replica down")
        forecaster = Forecaster(f.settings, Capacity(f.settings, f.client.store.redis))
        capacity_down = forecaster.forecast("interactive").pool_capacity
        counts = tally(f.client, ids, timeout=180)
        moved = sum(s.failovers for r in ids for s in f.client.get(r).steps)
        reliability_report("Triton replica killed (1 of 2)", **counts,
                           note=f"{sum(at_kill.values())} requests in flight there; {moved} model calls moved")
        assert sum(at_kill.values()) > 0  # the loss hit work in flight
        assert counts == {"submitted": 44, "completed": 44, "dead_lettered": 0, "lost": 0}
        assert moved > 0
        assert capacity_down == CAPACITY  # admission counts only the replica still up
        replicas.start(1)
        wait_for(lambda: board(f)["r1"].up, "the replica rejoining", timeout_s=60)
        later = [f.client.submit("oneshot", {"topic": f"after the return {i}"}, priority="batch") for i in range(24)]
        runs = [f.client.wait(r, timeout=120) for r in later]
        assert all(r.status == "succeeded" for r in runs)
        assert {r.steps[0].replica for r in runs} == {"r0", "r1"}  # it serves again
        assert forecaster.forecast("interactive").pool_capacity == 2 * CAPACITY
    finally:
        close_fleet(f)


def test_a_burst_beyond_what_the_pool_can_serve_in_time_is_refused_at_once_with_retry_after(
        redis_url, replicas, session_dir):
    f = pool_fleet(redis_url, replicas, session_dir, n=1)
    try:
        for i in range(6):  # admission learns how long an interactive model step takes here
            assert f.client.wait(f.client.submit("oneshot", {"topic": f"warm {i}"}), 30).status == "succeeded"
        admitted, refused = [], []
        for i in range(30):
            try:
                admitted.append(f.client.submit("oneshot", {"topic": f"burst {i}"}, deadline_s=1.0))
            except Overloaded as exc:
                refused.append(exc)
        runs = [f.client.wait(r, timeout=60) for r in admitted]
        assert CAPACITY <= len(admitted) < 30 and refused
        for exc in refused:
            assert exc.retry_after_s >= 1
            msg = str(exc)
            assert "interactive queue" in msg and "1 of 1 replicas up" in msg and "retry in" in msg
        assert all(r.status in ("succeeded", "expired") for r in runs)
        ledger = Forecaster(f.settings, Capacity(f.settings, f.client.store.redis)).admitted
        assert ledger.forecast(time.time(), 1, None).ahead == 0  # every admitted run left the ledger when it ended
    finally:
        close_fleet(f)
