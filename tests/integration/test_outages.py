"""Outages of the fleet's dependencies: Redis restarted (AOF on), Triton stopped mid-batch.

This module runs its own Redis and its own Triton, so that stopping them disturbs no
other test.
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid

import pytest
import redis

from fleet.errors import Overloaded
from fleet.ops import launch
from fleet.run.records import TERMINAL
from fleet.surfaces.client import FleetClient
from tests.support.tls import tls_files

from .conftest import REPO, TEST_SIM_PARAMS, Fleet, TritonInfo, make_settings, tally

pytestmark = pytest.mark.integration


class OwnServers:
    """A Redis and a Triton on fixed ports, which tests stop and start again."""

    def __init__(self, root) -> None:  # noqa: ANN001
        self.root = root
        self.procs = launch.Processes(root / "logs")
        self.redis_port = launch.free_port()
        self.triton_ports = (launch.free_port(), launch.free_port(), launch.free_port())
        self.repo = launch.sim_repository(root / "models", **TEST_SIM_PARAMS)

    def start_redis(self) -> str:
        return launch.start_redis(self.procs, self.root / "redis", port=self.redis_port, name="redis")

    def start_triton(self) -> TritonInfo:
        ep = launch.start_triton(self.procs, self.root / "triton", ["medium_sim"], name="triton",
                                 repository=self.repo, ports=self.triton_ports)
        return TritonInfo(ep.grpc_url, ep.http_url, ep.metrics_url)


@pytest.fixture(scope="module")
def outage(session_dir):
    servers = OwnServers(session_dir / f"outage-{uuid.uuid4().hex[:6]}")
    redis_url = servers.start_redis()
    triton = servers.start_triton()
    prefix = f"o{uuid.uuid4().hex[:8]}"
    settings, env = make_settings(
        redis_url, triton, prefix, step_time_limit_s=5, visibility_timeout_s=6,
        stall_after_s=10, reconcile_interval_s=1, retry_max_attempts=30, retry_backoff_base_s=0.2, retry_backoff_max_s=1.0,
    )
    client = FleetClient(settings)
    fleet = Fleet(settings, env, servers.procs, client)
    try:
        fleet.start_worker("inference", "llm", "threads", 8)
        fleet.start_worker("tools", "tool", "prefork", 2)
        yield fleet, servers
    finally:
        servers.procs.stop()
        client.close()


def _first_step_done(fleet: Fleet, run_id: str) -> None:
    for event in fleet.client.events(run_id, timeout=30):
        if event["type"] == "step" and event["status"] == "done":
            return
    raise AssertionError(f"run {run_id}: no step finished")


def test_redis_restart_with_aof_loses_no_run(outage, reliability_report):
    fleet, servers = outage
    ids = [fleet.client.submit("writer", {"topic": f"redis restart {i}"}, priority="batch") for i in range(20)]
    _first_step_done(fleet, ids[0])
    unfinished = sum(s not in TERMINAL for s in fleet.client.store.statuses(ids))
    servers.procs.stop("redis")  # SIGTERM: Redis writes its AOF and exits
    servers.start_redis()  # same port, same data directory
    counts = tally(fleet.client, ids, timeout=120)
    redelivered = sum(any(s.attempts > 1 for s in fleet.client.get(r).steps) for r in ids)
    reliability_report("Redis restarted (AOF)", **counts,
                       note=f"{unfinished} runs unfinished at the restart, {redelivered} had a step redelivered")
    assert unfinished > 0  # the restart hit work in flight
    stuck = [fleet.client.get(r) for r in ids if fleet.client.get(r).status not in ("succeeded", "dead_lettered")]
    assert counts["lost"] == 0, (counts, [(r.id, r.status, [(s.key, s.status, s.attempts) for s in r.steps]) for r in stuck])
    assert counts["completed"] + counts["dead_lettered"] == len(ids)
    for run_id in ids:
        run = fleet.client.get(run_id)
        if run.status == "succeeded":
            assert len(run.result.split()) == 48


def test_parked_runs_survive_a_redis_restart_and_a_signal_after_it_resumes_them(outage, reliability_report):
    fleet, servers = outage
    ids = [fleet.client.submit("approval", {"request": f"refund {i}"}, deadline_s=300) for i in range(3)]
    deadline = time.time() + 60
    while time.time() < deadline and fleet.client.store.statuses(ids) != ["waiting"] * 3:
        time.sleep(0.2)
    assert fleet.client.store.statuses(ids) == ["waiting"] * 3
    servers.procs.stop("redis")  # SIGTERM: Redis writes its AOF and exits
    servers.start_redis()  # same port, same data directory
    deadline = time.time() + 30
    while True:  # the client's connections come back with Redis
        try:
            outcomes = [fleet.client.signal(r, "approve", {"note": "approved after the restart"}) for r in ids]
            break
        except redis.exceptions.ConnectionError:
            assert time.time() < deadline
            time.sleep(0.5)
    counts = tally(fleet.client, ids, timeout=90)
    reliability_report("Redis restarted with runs parked", **counts)
    assert outcomes == ["resumed"] * 3
    assert counts["completed"] == 3 and counts["lost"] == 0
    assert all(fleet.client.get(r).outputs["approval"] == {"note": "approved after the restart"} for r in ids)


def test_triton_back_within_the_deadline_completes_every_run(outage, reliability_report):
    fleet, servers = outage
    ids = [fleet.client.submit("calculator", {"question": f"What is {i} * 3?"}, deadline_s=60) for i in range(12)]
    _first_step_done(fleet, ids[0])
    servers.procs.stop("triton", sig=signal.SIGKILL)
    servers.start_triton()
    counts = tally(fleet.client, ids, timeout=90)
    steps = [s for r in ids for s in fleet.client.get(r).steps]
    resent, retried = sum(s.failovers > 0 for s in steps), sum(s.attempts > 1 for s in steps)
    reliability_report("Triton down, back in time", **counts,
                       note=f"{resent} model calls lost Triton and were sent again, {retried} steps retried")
    assert resent + retried > 0  # the outage hit steps in flight or about to start
    assert counts == {"submitted": 12, "completed": 12, "dead_lettered": 0, "lost": 0}
    results = [fleet.client.get(r).result for r in ids]
    assert results == [f"The answer is {i * 3}." for i in range(12)]


def test_triton_gone_past_the_retries_dead_letters_then_replay_completes(outage, reliability_report):
    fleet, servers = outage
    # A fleet namespace whose workers give up sooner: three attempts.
    prefix = f"i{uuid.uuid4().hex[:8]}"
    settings, env = make_settings(fleet.settings.redis_url, TritonInfo(fleet.env["FLEET_TRITON_GRPC_URL"],
                                  fleet.env["FLEET_TRITON_HTTP_URL"]), prefix,
                                  retry_max_attempts=3, retry_backoff_base_s=0.2, retry_backoff_max_s=0.5,
                                  triton_connect_wait_s=1)
    impatient = Fleet(settings, env, launch.Processes(servers.root / "logs" / prefix), FleetClient(settings))
    try:
        impatient.start_worker("inference", "llm", "threads", 4)
        impatient.start_worker("tools", "tool", "prefork", 1)
        servers.procs.stop("triton", sig=signal.SIGKILL)
        client = impatient.client
        ids = [client.submit("calculator", {"question": f"What is {i} + 1?"}) for i in range(6)]
        first = tally(client, ids, timeout=60)
        attempts = [max(s.attempts for s in client.get(r).steps) for r in ids]
        reliability_report("Triton gone, dead-lettered", **first, note=f"attempts per run: {sorted(set(attempts))}")
        assert first == {"submitted": 6, "completed": 0, "dead_lettered": 6, "lost": 0}
        assert attempts == [3] * 6  # each spent its attempts on the outage
        assert all(client.get(r).error["step"] == "plan" for r in ids)
        servers.start_triton()
        replayed = client.dlq_replay_all(agent="calculator", step="plan")
        assert sorted(replayed) == sorted(ids)
        after = tally(client, ids, timeout=60)
        reliability_report("  ... replayed after Triton is back", **after)
        assert after == {"submitted": 6, "completed": 6, "dead_lettered": 0, "lost": 0}
        assert [client.get(r).result for r in ids] == [f"The answer is {i + 1}." for i in range(6)]
    finally:
        impatient.procs.stop()
        impatient.client.close()


def test_redis_at_its_memory_limit_refuses_submissions_and_steps_wait(outage, reliability_report, tmp_path):
    _, servers = outage
    redis_url = outage[0].settings.redis_url
    prefix = f"m{uuid.uuid4().hex[:8]}"
    # Step time limit well above the time Redis stays full: steps wait instead of being killed.
    agents = tmp_path / "agents"
    agents.mkdir()
    shutil.copy(REPO / "tests" / "support" / "gated.toml", agents)
    settings, env = make_settings(redis_url, TritonInfo(outage[0].settings.triton_grpc_url,
                                                        outage[0].settings.triton_http_url), prefix,
                                  step_time_limit_s=120, visibility_timeout_s=180, agents_dir=str(agents),
                                  tool_modules='["tests.support.faulty_tools"]')
    client = FleetClient(settings)
    fleet = Fleet(settings, env, launch.Processes(servers.root / "logs" / prefix), client)
    admin = client.store.redis
    gate = tmp_path / "gate"
    try:
        fleet.start_worker("tools", "tool", "prefork", 2)
        ids = [client.submit("gated", {"gate": str(gate)}, priority="batch") for _ in range(2)]
        launch.wait_until(lambda: all(client.get(r).status == "running" for r in ids), 30, "runs at the gate")
        # Fill Redis: 4 MB of data, then a limit 1 MB below what it holds.
        filled = 16
        for i in range(filled):
            admin.set(f"{prefix}:ballast:{i}", b"x" * (256 * 1024))
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1024 * 1024)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set(f"{prefix}:probe", "x")
        refused = None
        try:
            client.submit("gated", {"gate": str(gate)}, priority="batch")
        except Overloaded as exc:
            refused = exc
        gate.touch()  # the steps in flight finish their work and meet the full Redis
        log = servers.root / "logs" / prefix / "tools.log"
        launch.wait_until(lambda: log.read_text().count("holding its output") >= 2, 30, "steps waiting for room")
        while_full = [client.get(r).status for r in ids]
        admin.delete(*[f"{prefix}:ballast:{i}" for i in range(filled)])  # memory frees
        counts = tally(client, ids, timeout=60)
        waited = log.read_text().count("holding its output")  # waited with its work done, not redone
        after = client.submit("gated", {"gate": str(gate)}, priority="batch")
        later = client.wait(after, timeout=30).status
        reliability_report("Redis at maxmemory, then freed", **counts,
                           note=f"{waited} waits of steps in flight; submission refused: {refused is not None}")
        assert refused is not None and "Redis is full" in str(refused) and refused.retry_after_s > 0
        assert waited >= 2  # the full Redis hit both steps in flight
        assert while_full == ["running", "running"]  # neither failed nor dead-lettered while waiting
        assert counts == {"submitted": 2, "completed": 2, "dead_lettered": 0, "lost": 0}
        assert [client.get(r).result for r in ids] == [4, 4]
        assert all(s.attempts == 1 for r in ids for s in client.get(r).steps)  # waited, not retried
        assert later == "succeeded"
    finally:
        for key in admin.scan_iter(f"{prefix}:ballast:*"):
            admin.delete(key)
        admin.config_set("maxmemory", 0)
        fleet.procs.stop()
        client.close()


def test_a_fleet_over_tls_to_a_password_protected_redis(outage, tmp_path):
    _, servers = outage
    procs = launch.Processes(tmp_path / "logs")
    port = launch.free_port()
    try:
        url = launch.start_redis(procs, tmp_path / "redis", password="tls-test-pw",
                                 config={"tls-port": str(port), **tls_files(tmp_path / "tls")})
        assert url.startswith("rediss://")
        # Neither plain text nor a missing password gets in.
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=3, password="tls-test-pw").ping()
        no_password = url.replace(":tls-test-pw@", "")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(no_password, socket_timeout=3).ping()
        triton = TritonInfo(outage[0].settings.triton_grpc_url, outage[0].settings.triton_http_url)
        settings, env = make_settings(url, triton, f"s{uuid.uuid4().hex[:8]}")
        fleet = Fleet(settings, env, procs, FleetClient(settings))
        fleet.start_worker("inference", "llm", "threads", 2)
        fleet.start_worker("tools", "tool", "prefork", 1)
        run_id = fleet.client.submit("calculator", {"question": "What is 6 * 7?"})
        run = fleet.client.wait(run_id, timeout=60)
        assert (run.status, run.result) == ("succeeded", "The answer is 42.")
        fleet.client.close()
    finally:
        procs.stop()
