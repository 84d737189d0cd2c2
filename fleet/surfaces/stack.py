"""The local stack behind ``fleet up``: Redis, Triton with the dev model, workers, Flower, a demo.

``fleet up --ha`` runs Redis as it runs where it must survive losing a host: a primary, two
replicas and three Sentinels (:mod:`fleet.ops.redis_ha`), every process of the stack following
the primary through the Sentinels. ``kill -9`` the primary (``fleet status`` names it) and the
stack goes on with a promoted replica.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fleet.broker.app import create_app
from fleet.broker.queues import worker_queues
from fleet.connections import redis_client
from fleet.core import tracing
from fleet.inference.triton import TritonClient
from fleet.ops import launch, redis_ha
from fleet.settings import Settings

log = logging.getLogger(__name__)

STACK_ENV = Path(".fleet/stack.env")


@dataclass
class Stack:
    """The running local stack."""

    settings: Settings
    procs: launch.Processes
    flower_url: str
    #: Processes whose death the stack outlives: the Redis servers behind Sentinels.
    expendable: frozenset[str] = frozenset()

    def stop(self) -> None:
        self.procs.stop()
        STACK_ENV.unlink(missing_ok=True)


def _flower_answers(url: str, auth: str | None) -> bool:
    req = urllib.request.Request(url + "/healthcheck")
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=1) as resp:
        return resp.status == 200


def _port_or_free(address: str, port: int) -> int:
    """``port`` if nothing listens on it, else a free one (also for port 0)."""
    if port == 0:
        return launch.free_port()
    try:
        with socket.socket() as sock:
            sock.bind((address, port))
        return port
    except OSError:
        return launch.free_port()


def _is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "localhost", "::1")


def start_stack(settings: Settings, say=print, ha: bool = False) -> Stack:  # noqa: ANN001
    """Start every component the fleet needs here, reusing Redis/Triton the environment names
    (``ha``: a Redis primary, two replicas and three Sentinels when it names none)."""
    data = settings.data_dir
    procs = launch.Processes(data / "logs")
    try:
        return _start(settings, procs, data, say, ha)
    except BaseException:
        procs.stop()
        raise


def _start(settings: Settings, procs: launch.Processes, data: Path, say, ha: bool) -> Stack:  # noqa: ANN001
    if not _is_loopback(settings.bind_address) and (settings.flower_basic_auth is None or not settings.api_key_list()):
        raise SystemExit(
            f"refusing to listen on {settings.bind_address} without authentication: "
            "set FLEET_FLOWER_BASIC_AUTH and FLEET_API_KEYS"
        )
    # What the stack's processes (and CLI commands beside it) are told, on top of the environment.
    env = {**_redis(settings, procs, data, say, ha), **_triton(settings, procs, data, say)}
    # Flower's login: the operator's, or one made for this stack (shown below, kept in
    # stack.env for the CLI beside it).
    flower_auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
    if flower_auth is None:
        flower_auth = f"fleet:{launch.new_secret(12)}"
        env["FLEET_FLOWER_BASIC_AUTH"] = flower_auth
    stack_settings = Settings(**{**_as_init(env), "_env_file": None})
    nodes, metrics_ports = _workers(stack_settings, procs, env)
    port = _port_or_free(settings.bind_address, stack_settings.flower_port)
    flower = launch.start_flower(procs, port, settings.bind_address, flower_auth, env=env)
    flower_url = f"http://{settings.bind_address}:{port}"
    gateway_port = _port_or_free(settings.bind_address, stack_settings.gateway_port)
    gateway = procs.start("gateway", [sys.executable, "-m", "fleet.surfaces.cli", "gateway", "--host",
                                      settings.bind_address, "--port", str(gateway_port)], env=env)
    gateway_url = f"http://{settings.bind_address}:{gateway_port}"
    # Secrets inside (the Redis password, Flower's login): readable by its owner only. CLI
    # commands beside the stack find it, Flower and the gateway where they really listen.
    env.update(FLEET_FLOWER_PORT=str(port), FLEET_GATEWAY_PORT=str(gateway_port))
    launch.write_private(STACK_ENV, "".join(f"{k}={v}\n" for k, v in env.items()))
    stack_settings = Settings(**{**_as_init(env), "_env_file": None})
    app = create_app(stack_settings)
    for node in nodes:
        launch.wait_until(lambda n=node: launch.worker_answers(app, n), 60, f"worker {node}",
                          procs.children[node.split("@")[0]], 0.5)
    launch.wait_until(lambda: _flower_answers(flower_url, flower_auth), 60, "flower", flower, 0.3)
    launch.wait_until(lambda: launch.http_json(gateway_url + "/healthz", timeout_s=1) is not None, 60,
                      "gateway", gateway, 0.3)
    say(f"workers    {', '.join(nodes)} answering")
    say(f"flower     {flower_url}  (login {flower_auth})")
    say(f"gateway    {gateway_url}  (OpenAPI at {gateway_url}/docs)")
    say(f"console    {gateway_url}/console  (runs, their timelines, dead letters, tenants)")
    say(f"metrics    triton {stack_settings.triton_metrics_url}")
    for name, metrics_port in metrics_ports.items():
        say(f"metrics    {name} http://{settings.bind_address}:{metrics_port}/metrics")
    say(f"logs       {procs.log_dir}/")
    expendable = frozenset(n for n in procs.children if ha and n.startswith("redis-"))
    return Stack(stack_settings, procs, flower_url, expendable)


def _as_init(env: dict[str, str]) -> dict[str, str]:
    """``FLEET_*`` variables as settings' field names (the environment supplies the rest)."""
    return {k.removeprefix("FLEET_").lower(): v for k, v in env.items() if k.startswith("FLEET_")}


def _redis(settings: Settings, procs: launch.Processes, data: Path, say, ha: bool) -> dict[str, str]:  # noqa: ANN001
    """The stack's Redis, as the variables that name it: the Sentinels or the URL the environment
    names if they answer, else a topology (``ha``) or one Redis started here."""
    if settings.redis_sentinels and _answers(settings):
        say(f"redis      reusing the primary {settings.redis_master_name} of the Sentinels {','.join(settings.redis_sentinels)}")
        return {}
    if "FLEET_REDIS_URL" in os.environ and not ha and launch.redis_answers(settings.redis_url):
        say(f"redis      reusing {settings.redis_url}")
        return {"FLEET_REDIS_URL": settings.redis_url}
    if ha:
        topology = redis_ha.start_redis_ha(procs, data / "redis-ha")
        say(f"redis      primary {topology.primary().address}, replicas "
            f"{', '.join(n.address for n in topology.nodes[1:])}, Sentinels {', '.join(topology.sentinels)} "
            f"(down after {topology.down_after_ms} ms; generated passwords in {STACK_ENV})")
        say("redis      kill -9 the primary to see a failover: `fleet status` names the primary of the moment")
        return topology.env()
    # A password even on loopback: every local process can reach a loopback port.
    url = launch.start_redis(procs, data / "redis", password=launch.new_secret())
    say(f"redis      started on {url.rpartition('@')[2]} with a generated password "
        f"(AOF in {data / 'redis'}; the URL is in {STACK_ENV})")
    return {"FLEET_REDIS_URL": url}


def _answers(settings: Settings) -> bool:
    try:
        return bool(redis_client(settings, socket_timeout=2, socket_connect_timeout=2,
                                 retry=None).ping())
    except Exception:  # noqa: BLE001 - not there
        return False


def _triton(settings: Settings, procs: launch.Processes, data: Path, say) -> dict[str, str]:  # noqa: ANN001
    """The stack's Triton: the one ``FLEET_TRITON_GRPC_URL`` names if its model is ready, else
    one started here with the dev model (its endpoints, as variables)."""
    if "FLEET_TRITON_GRPC_URL" in os.environ and TritonClient(settings.triton_grpc_url).model_ready(settings.triton_model):
        say(f"triton     reusing {settings.triton_grpc_url} (model {settings.triton_model} ready)")
        return {}
    say("triton     starting tritonserver with the dev model ...")
    # With tracing on, Triton's own spans (queue, compute) join each run's trace.
    trace = (launch.triton_trace_args(tracing.traces_url(os.environ))
             if tracing.wanted(settings.tracing, os.environ) else None)
    # The catalog's models that the repository holds; beside the medium model's simulator, the
    # small model's, which the role "small" names unless FLEET_MODEL_ROLES says otherwise.
    models = [m for m in settings.catalog() if (launch.MODEL_REPOSITORY / m).is_dir()] or [settings.triton_model]
    roles: dict[str, str] = {}
    if settings.triton_model == "medium_sim" and not settings.model_roles and "small_sim" not in models:
        models.append("small_sim")
        roles = {"FLEET_MODEL_ROLES": json.dumps({"small": "small_sim"})}
    ep = launch.start_triton(procs, data / "triton", models, address=settings.bind_address, trace=trace)
    say(f"triton     ready: grpc {ep.grpc_url}, http {ep.http_url}, models {', '.join(models)}"
        + (f", traces to {tracing.traces_url(os.environ)}" if trace else ""))
    return {"FLEET_TRITON_GRPC_URL": ep.grpc_url, "FLEET_TRITON_HTTP_URL": ep.http_url,
            "FLEET_TRITON_METRICS_URL": ep.metrics_url, **roles}


def _workers(settings: Settings, procs: launch.Processes, env: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """The stack's workers (their node names) and the ports their metrics are served on."""
    host = socket.gethostname()
    # Workers share this host: each serves its /metrics on a port of its own.
    ports = {name: launch.free_port() for name in ("inference-interactive", "inference-shared", "tools")}

    def worker_env(name: str) -> dict[str, str]:
        return {**env, "FLEET_METRICS_PORT": str(ports[name])}

    nodes = [
        # Capacity only interactive work can use: however deep the batch backlog, these
        # threads are free for the next interactive step.
        launch.start_worker(procs, "inference-interactive", worker_queues(settings, "llm", ("interactive",)),
                            "threads", settings.inference_interactive_concurrency,
                            worker_env("inference-interactive"), node=f"inference-interactive@{host}"),
        # Shared capacity: takes interactive first (queue order), batch otherwise.
        launch.start_worker(procs, "inference-shared", worker_queues(settings, "llm"), "threads",
                            settings.inference_concurrency, worker_env("inference-shared"),
                            node=f"inference-shared@{host}"),
        launch.start_worker(procs, "tools", worker_queues(settings, "tool"), "prefork",
                            settings.tool_concurrency, worker_env("tools"), node=f"tools@{host}"),
    ]
    return nodes, ports


def run_demo(settings: Settings, say=print) -> int:  # noqa: ANN001
    """Submit interactive and batch runs of the built-in agents; print one line per run."""
    from fleet.surfaces.client import FleetClient

    plan = [
        ("calculator", {"question": "What is 12 * 7 + 3?"}, "interactive"),
        ("solver", {"question": "What is (17 + 4) * 3?"}, "interactive"),
        ("calculator", {"question": "How many words are in this question?"}, "interactive"),
        ("writer", {"topic": "why queues need deadlines"}, "batch"),
        ("writer", {"topic": "interactive work ahead of batch work"}, "batch"),
        ("solver", {"question": "What is 2 ^ 10 - 24?"}, "batch"),
        # The agent shapes: tool calls at once, a map over a list, model routing, a wait.
        ("multicalc", {"question": "What are 12 * 7 and 3 + 4 and 100 / 8?"}, "interactive"),
        ("fanout", {"items": "queues; deadlines; retries; dead letters"}, "interactive"),
    ]
    if "small" in settings.model_roles:
        plan.append(("triage", {"message": "My invoice shows the wrong address."}, "interactive"))
    failures = 0
    with FleetClient(settings) as client:
        ids = [(client.submit(agent, inp, priority=prio), agent, prio) for agent, inp, prio in plan]
        approval = client.submit("approval", {"request": "Please refund my last order."}, deadline_s=120)
        ids.append((approval, "approval", "interactive"))
        say(f"demo       submitted {len(ids)} runs; waiting ...")
        for _ in range(600):  # the approval run parks at its wait step; the demo approves it
            if client.get(approval).status not in ("queued", "running"):
                break
            time.sleep(0.1)
        say(f"demo       approval run {approval[:8]} is {client.get(approval).status}; signalling 'approve'")
        client.signal(approval, "approve", {"note": "approved by the demo"})
        for run_id, agent, prio in ids:
            run = client.wait(run_id, timeout=120)
            failures += run.status != "succeeded"
            result = str(run.result if run.status == "succeeded" else run.error)
            latency = f"{run.latency_s:.2f}s" if run.latency_s is not None else "-"
            say(f"  {agent:<11} {prio:<12} {run.status:<10} {latency:>7}  tokens {run.tokens_in:>4} in "
                f"{run.tokens_out:>4} out  {run_id[:8]}  {result[:60]}")
    return failures


def up(settings: Settings, demo: bool = False, exit_after_demo: bool = False, say=print,  # noqa: ANN001
       ha: bool = False) -> int:
    """Start the stack in the foreground until Ctrl-C (or after the demo, if asked)."""
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ANN001, ARG001
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = start_stack(settings, say, ha)
    code = 0
    try:
        if demo:
            failed = run_demo(stack.settings, say)
            say(f"demo       {'all runs succeeded' if not failed else f'{failed} runs did not succeed'}")
            code = 1 if failed else 0
        if not exit_after_demo:
            say("fleet is up. Ctrl-C stops every process it started.")
            say("in another shell here: fleet runs list / fleet runs show ID --timeline (an id above will do) / "
                "fleet status / fleet agents / "
                "fleet submit calculator --input '{\"question\": \"What is 6*7?\"}' --wait")
            lost: set[str] = set()
            while not stop.wait(1.0):
                dead = [n for n, p in stack.procs.children.items() if p.poll() is not None]
                for name in sorted(set(dead) & stack.expendable - lost):
                    lost.add(name)
                    say(f"redis      {name} exited; the Sentinels promote a replica, the stack goes on")
                dead = [n for n in dead if n not in stack.expendable]
                if dead:
                    say(f"stopping: {', '.join(dead)} exited (see {stack.procs.log_dir})")
                    code = 1
                    break
    finally:
        say("stopping the stack ...")
        stack.stop()
        say("stopped.")
    return code

