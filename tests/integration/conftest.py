"""Fixtures: a real Redis and a real Triton server, started here when none is given.

- ``FLEET_TEST_REDIS_URL``: use that Redis instead of starting ``redis-server``.
- ``FLEET_TEST_TRITON_GRPC_URL`` and ``FLEET_TEST_TRITON_HTTP_URL``: use that Triton
  (serving ``medium_sim``) instead of starting ``tritonserver``.

Each test module gets its own key and queue prefix, and its own worker processes.
"""

from __future__ import annotations

import os
import platform

# Tests start workers (fork, then exec) while gRPC channels of the test process may be busy;
# gRPC's fork handlers then run in a child that only goes on to exec, and can crash it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.broker.queues import worker_queues
from fleet.ops import launch
from fleet.settings import Settings
from fleet.surfaces.client import FleetClient
from tests.support.waiting import poll

# Timing of the dev model in tests: a small medium model, so that suites stay fast while
# batching and streaming are still visible.
TEST_SIM_PARAMS = {"ttft_ms": 20, "prefill_ms_per_token": 0.05, "tpot_ms": 4, "load_factor": 0.02}


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="session")
def session_procs(session_dir: Path) -> Iterator[launch.Processes]:
    procs = launch.Processes(session_dir / "logs")
    yield procs
    procs.stop()


@pytest.fixture(scope="session")
def redis_url(session_procs: launch.Processes, session_dir: Path) -> str:
    given = os.environ.get("FLEET_TEST_REDIS_URL")
    if given:
        return given
    return launch.start_redis(session_procs, session_dir / "redis")


@dataclass
class TritonInfo:
    grpc_url: str
    http_url: str
    metrics_url: str = ""
    params: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def triton(session_procs: launch.Processes, session_dir: Path) -> TritonInfo:
    grpc_url = os.environ.get("FLEET_TEST_TRITON_GRPC_URL")
    if grpc_url:
        return TritonInfo(grpc_url, os.environ["FLEET_TEST_TRITON_HTTP_URL"],
                          os.environ.get("FLEET_TEST_TRITON_METRICS_URL", ""))
    repo = launch.sim_repository(session_dir / "models", **TEST_SIM_PARAMS)
    ep = launch.start_triton(session_procs, session_dir / "triton", ["medium_sim"], repository=repo)
    return TritonInfo(ep.grpc_url, ep.http_url, ep.metrics_url, dict(TEST_SIM_PARAMS))


@dataclass
class Fleet:
    """A fleet namespace of one test module: settings, a client, its worker processes."""

    settings: Settings
    env: dict[str, str]
    procs: launch.Processes
    client: FleetClient
    nodes: dict[str, str] = field(default_factory=dict)

    def start_worker(self, name: str, kind: str, pool: str = "threads", concurrency: int = 8,
                     classes: tuple[str, ...] = ("interactive", "batch"), **env: str) -> str:
        node = f"{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        queues = worker_queues(self.settings, kind, classes)  # type: ignore[arg-type]
        launch.start_worker(self.procs, name, queues, pool, concurrency, {**self.env, **env},
                            node=node, loglevel="INFO")
        launch.wait_until(lambda: launch.worker_answers(self.client.app, node), 60,
                          f"worker {name}", self.procs.children[name], 0.3)
        self.nodes[name] = node
        return node

    def start_metered_worker(self, name: str, kind: str, pool: str = "threads", concurrency: int = 8,
                             **env: str) -> str:
        """A worker serving its Prometheus metrics on a port of its own; returns their URL."""
        port = launch.free_port()
        self.start_worker(name, kind, pool, concurrency, FLEET_METRICS_PORT=str(port), **env)
        return f"http://127.0.0.1:{port}/metrics"


REPO = Path(__file__).resolve().parents[2]
# Agents and tools that fail or stall on purpose, next to the built-in ones.
TEST_AGENTS_AND_TOOLS = {
    "tool_modules": '["tests.support.faulty_tools"]',
    "agents_dir": str(REPO / "tests" / "support" / "agents"),
}


def make_settings(redis_url: str, triton: TritonInfo, prefix: str, **overrides: object) -> tuple[Settings, dict[str, str]]:
    env = {
        "FLEET_REDIS_URL": redis_url,
        "FLEET_KEY_PREFIX": prefix,
        "FLEET_QUEUE_PREFIX": f"{prefix}.",
        "FLEET_TRITON_GRPC_URL": triton.grpc_url,
        "FLEET_TRITON_HTTP_URL": triton.http_url,
        "FLEET_RETRY_BACKOFF_BASE_S": "0.05",
        "FLEET_RETRY_BACKOFF_MAX_S": "0.5",
        "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
        **{f"FLEET_{k.upper()}": str(v) for k, v in overrides.items()},
    }
    # Parsed exactly as a worker process parses its environment.
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.syspath_prepend(str(REPO))
        return Settings(_env_file=None), env


def new_fleet(redis_url: str, triton: TritonInfo, session_dir: Path, letter: str = "t",
              test_agents: bool = True, **overrides: object) -> Fleet:
    """A fresh fleet namespace (own key and queue prefix, the test agents and tools unless
    ``test_agents`` is False), no workers."""
    prefix = f"{letter}{uuid.uuid4().hex[:8]}"
    settings, env = make_settings(redis_url, triton, prefix,
                                  **{**(TEST_AGENTS_AND_TOOLS if test_agents else {}), **overrides})
    # The operator's client: it sees every tenant's runs (and submits as the default tenant).
    return Fleet(settings, env, launch.Processes(session_dir / "logs" / prefix), FleetClient(settings, admin=True))


def close_fleet(f: Fleet) -> None:
    f.procs.stop()
    f.client.close()


def running_fleet(redis_url: str, triton: TritonInfo, session_dir: Path, letter: str = "t",
                  **overrides: object) -> Iterator[Fleet]:
    """A fresh namespace with an inference worker and a tool worker, stopped afterwards."""
    f = new_fleet(redis_url, triton, session_dir, letter, **overrides)
    try:
        f.start_worker("inference", "llm", "threads", 8)
        f.start_worker("tools", "tool", "prefork", 2)
        yield f
    finally:
        close_fleet(f)


@pytest.fixture(scope="module")
def fleet(redis_url: str, triton: TritonInfo, session_dir: Path) -> Iterator[Fleet]:
    """A module's own fleet namespace with an inference worker and a tool worker."""
    yield from running_fleet(redis_url, triton, session_dir)


@contextmanager
def served_gateway(settings: Settings) -> Iterator[str]:
    """The gateway of ``settings`` served by uvicorn on a free loopback port (in a thread of this
    process) until the block ends; its base URL."""
    import uvicorn

    from fleet.surfaces.gateway import create_gateway

    port = launch.free_port()
    server = uvicorn.Server(uvicorn.Config(create_gateway(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    launch.wait_until(lambda: server.started, 30, "gateway", interval_s=0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "gateway did not stop"


def model_metrics(metrics_url: str, done: float | None = None, timeout_s: float = 10.0) -> dict[str, float]:
    """The simulator's own engine metrics on Triton's metrics port (``vllm:*``, ``medium_sim:*``),
    once ``vllm:request_success_total`` reaches ``done`` (the model publishes them every 50 ms)."""
    import urllib.request

    assert metrics_url, "the Triton under test has no metrics URL (set FLEET_TEST_TRITON_METRICS_URL)"

    def read() -> dict[str, float]:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(("vllm:", "medium_sim:")) and 'model="medium_sim"' in line}

    # The model publishes its metrics every 50 ms.
    return poll(read, lambda found: done is None or found.get("vllm:request_success_total", 0) >= done, timeout_s)


def tally(client: FleetClient, run_ids: list[str], timeout: float) -> dict[str, int]:
    """Wait for the runs and count them: submitted, completed, dead-lettered, lost."""
    statuses = [client.wait(r, timeout=timeout).status for r in run_ids]
    return {
        "submitted": len(run_ids),
        "completed": statuses.count("succeeded"),
        "dead_lettered": statuses.count("dead_lettered"),
        "lost": sum(s not in ("succeeded", "dead_lettered") for s in statuses),
    }


# --- reliability figures ----------------------------------------------------------------
_RELIABILITY: list[dict[str, object]] = []


@pytest.fixture
def reliability_report():
    """Record a scenario's counts: submitted, completed, dead_lettered, lost (+ a note)."""

    def record(scenario: str, submitted: int, completed: int, dead_lettered: int, lost: int,
               note: str = "") -> None:
        _RELIABILITY.append(dict(scenario=scenario, submitted=submitted, completed=completed,
                                 dead_lettered=dead_lettered, lost=lost, note=note))

    return record


def _provenance(config, out: Path) -> list[str]:  # noqa: ANN001
    """The command, commit and machine of the run that made the report (as every results file names them)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    env = f"FLEET_RELIABILITY_OUT={where} " if os.environ.get("FLEET_RELIABILITY_OUT") else ""
    command = f"{env}python -m pytest {' '.join(config.invocation_params.args)}".strip()
    dirty = " +changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return [f"Command: `{command}`  ",
            f"Commit: `{git('rev-parse', '--short=12', 'HEAD') + dirty}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.  "]


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ARG001
    if not _RELIABILITY:
        return
    tr = terminalreporter
    tr.section("reliability: runs submitted / completed / dead-lettered / lost")
    tr.write_line(f"{'scenario':<34} {'submitted':>9} {'completed':>9} {'dead-lettered':>13} {'lost':>5}  note")
    for row in _RELIABILITY:
        tr.write_line(f"{row['scenario']:<34} {row['submitted']:>9} {row['completed']:>9} "
                      f"{row['dead_lettered']:>13} {row['lost']:>5}  {row['note']}")
    # The same as a Markdown table: README's reliability figures are this file of a full run.
    out = Path(os.environ.get("FLEET_RELIABILITY_OUT", REPO / ".fleet" / "reliability.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Reliability: every run of every fault scenario counted", "", *_provenance(config, out), "",
             "| scenario | submitted | completed | dead-lettered | lost | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['scenario'].strip()} | {r['submitted']} | {r['completed']} | {r['dead_lettered']} | {r['lost']} "
              f"| {r['note']} |" for r in _RELIABILITY]
    out.write_text("\n".join(lines) + "\n")
    tr.write_line(f"(as Markdown: {out})")
