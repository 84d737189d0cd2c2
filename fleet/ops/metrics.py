"""Prometheus metrics of the fleet, and the ``/metrics`` endpoint each worker serves.

Two kinds of series:

- What a worker saw (run latency, step durations, TTFT, tokens, retries, dead letters,
  finished runs): recorded by the hooks below, which the base task calls at the points of a
  step's life (commit, retry, dead letter, run finished). Prefork pool children cannot share
  memory with the process that serves ``/metrics``, so workers run prometheus_client's
  multiprocess mode: every process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
  and the endpoint adds them up (:func:`use_multiprocess_dir`, called before the pool starts).
- Fleet-wide facts read from Redis when scraped (queue depth, age of the oldest message,
  requests in flight at Triton): :class:`fleet.ops.gauges.FleetCollector`, which every worker's
  endpoint exposes too.

The endpoint is off unless ``FLEET_METRICS_PORT`` is set (``fleet up`` gives each worker
its own port).
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server, values

from fleet.ops.gauges import FleetCollector
from fleet.settings import Settings

if TYPE_CHECKING:
    from fleet.run.agent import LlmStep, ToolStep
    from fleet.run.records import RunRecord, StepRecord

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets span an interactive run (SLO 10 s) to a long batch run.
_RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)

RUN_LATENCY = Histogram("fleet_run_latency_seconds", "Run latency, submission to a terminal status.",
                        ["agent", "priority", "status"], buckets=_RUN_BUCKETS)
RUNS = Counter("fleet_runs", "Runs that reached a terminal status.", ["agent", "priority", "status"])
STEP_DURATION = Histogram("fleet_step_duration_seconds", "Duration of a committed step attempt.",
                          ["agent", "step", "kind", "priority"], buckets=_STEP_BUCKETS)
TTFT = Histogram("fleet_model_ttft_seconds", "Time to the first token of a model call.",
                 ["model", "priority"], buckets=_TTFT_BUCKETS)
TOKENS_IN = Counter("fleet_tokens_in", "Prompt tokens of committed model steps.", ["model", "priority"])
TOKENS_OUT = Counter("fleet_tokens_out", "Generated tokens of committed model steps.", ["model", "priority"])
RETRIES = Counter("fleet_step_retries", "Step attempts that failed transiently and were retried.",
                  ["agent", "step"])
DEAD_LETTERS = Counter("fleet_dead_letters", "Steps written to the dead-letter store.", ["agent", "step"])
# Usage by agent and class (fleet.run.usage): where a run's time and money go.
USAGE_RUNS = Counter("fleet_usage_runs", "Runs that ended, as usage counts them.", ["tenant", "agent", "priority"])
USAGE_STEPS = Counter("fleet_usage_steps", "Steps counted in usage.", ["tenant", "agent", "priority"])
USAGE_TOKENS_IN = Counter("fleet_usage_tokens_in", "Prompt tokens of model calls.", ["tenant", "agent", "priority"])
USAGE_TOKENS_OUT = Counter("fleet_usage_tokens_out", "Generated tokens of model calls.", ["tenant", "agent", "priority"])
USAGE_MODEL_S = Counter("fleet_usage_model_seconds", "Seconds at the model (model calls' durations).",
                        ["tenant", "agent", "priority"])
USAGE_QUEUE_S = Counter("fleet_usage_queue_seconds", "Seconds steps waited in queues.", ["tenant", "agent", "priority"])
USAGE_TOOL_S = Counter("fleet_usage_tool_seconds", "Seconds in tool steps.", ["tenant", "agent", "priority"])
USAGE_COST = Counter("fleet_usage_cost", "Estimated cost of model calls (FLEET_PRICE_*).", ["tenant", "agent", "priority"])
USAGE = {"runs": USAGE_RUNS, "steps": USAGE_STEPS, "tokens_in": USAGE_TOKENS_IN, "tokens_out": USAGE_TOKENS_OUT,
         "model_s": USAGE_MODEL_S, "queue_s": USAGE_QUEUE_S, "tool_s": USAGE_TOOL_S, "cost": USAGE_COST}


# --- hooks the base task calls ------------------------------------------------------------

def step_committed(agent: str, step: LlmStep | ToolStep, priority: str, record: StepRecord,
                   default_model: str) -> None:
    """A step's output was committed (once per step, whatever the deliveries)."""
    if record.status == "skipped":  # a loop step after the final answer: nothing ran
        return
    STEP_DURATION.labels(agent, step.name, step.kind, priority).observe(record.duration_s or 0.0)
    if step.kind != "llm":
        return
    model = record.model or getattr(step, "model", None) or default_model
    if record.ttft_s is not None:
        TTFT.labels(model, priority).observe(record.ttft_s)
    TOKENS_IN.labels(model, priority).inc(record.tokens_in)
    TOKENS_OUT.labels(model, priority).inc(record.tokens_out)


def step_retried(agent: str, step: str) -> None:
    """A step attempt failed transiently and goes back to its queue."""
    RETRIES.labels(agent, step).inc()


def dead_lettered(agent: str, step: str) -> None:
    """A step was written to the dead-letter store."""
    DEAD_LETTERS.labels(agent, step).inc()


def usage_added(tenant: str, agent: str, priority: str, figures: dict[str, float]) -> None:
    """Usage figures of a committed step, or of a run that ended (see fleet.run.usage)."""
    for name, value in figures.items():
        if value:
            USAGE[name].labels(tenant, agent, priority).inc(value)


def run_finished(run: RunRecord) -> None:
    """A run reached a terminal status in this worker (observed once per run)."""
    RUNS.labels(run.agent, run.priority, run.status).inc()
    if run.latency_s is not None:
        RUN_LATENCY.labels(run.agent, run.priority, run.status).observe(run.latency_s)


# --- the endpoint ---------------------------------------------------------------------------

def use_multiprocess_dir() -> str:
    """Put this worker's metrics in a multiprocess directory; call before the pool starts.

    A directory named by ``PROMETHEUS_MULTIPROC_DIR`` is emptied (files of an earlier run
    would be added to this one's); without one, a private temporary directory is made and
    removed at exit. Each worker needs its own: a shared one would mix workers' series.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="fleet-metrics-")
        os.environ[MULTIPROC_ENV] = path
        owner = os.getpid()
        # Forked pool children inherit atexit handlers: only the worker that made it removes it.
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    # prometheus_client picks its value class when imported, from the environment of that
    # moment; fleet's metrics are all labelled, so no value exists yet and switching is safe.
    values.ValueClass = values.MultiProcessValue()
    return path


def serve(settings: Settings) -> int | None:
    """Serve ``/metrics`` on ``FLEET_METRICS_PORT`` from a daemon thread; the port, or None if off."""
    if settings.metrics_port is None:
        return None
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
    else:  # a process that never called use_multiprocess_dir: its own values are all there is
        for metric in (RUN_LATENCY, RUNS, STEP_DURATION, TTFT, TOKENS_IN, TOKENS_OUT, RETRIES, DEAD_LETTERS,
                       *USAGE.values()):
            registry.register(metric)
    registry.register(FleetCollector(settings))
    start_http_server(settings.metrics_port, addr=settings.bind_address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.bind_address, settings.metrics_port)
    return settings.metrics_port
