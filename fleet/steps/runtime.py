"""What a worker process needs to run steps, assembled once per process (after fork) by
:func:`build_runtime`: its agents and stores, the inference pool, the step bodies, and the hooks,
each handed what it needs."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from fleet.connections import redis_client
from fleet.core import tracing
from fleet.core.listener import Listener
from fleet.inference.catalog import ModelCatalog
from fleet.inference.formats import Formats
from fleet.inference.pool import InferencePool
from fleet.run.agent import AgentDef, load_agents
from fleet.run.cancel import Cancellation
from fleet.run.cost import Prices
from fleet.run.deadletter import DeadLetters
from fleet.run.sessions import Sessions
from fleet.run.store import RunStore
from fleet.run.tools import load_tool_modules
from fleet.run.usage import UsageLedger
from fleet.scheduling.backlog import Backlog
from fleet.scheduling.capacity import Capacity
from fleet.settings import Settings
from fleet.steps.bodies import StepBodies
from fleet.steps.hooks import Hook
from fleet.steps.hooks.budget import BudgetGuard
from fleet.steps.hooks.fair_share import FairShare
from fleet.steps.hooks.guards import DeadlineGuard, KnownStepGuard, PoisonGuard, TerminalGuard
from fleet.steps.hooks.metrics import Metrics
from fleet.steps.hooks.sentry import SentryReports
from fleet.steps.hooks.sessions import SessionTurns
from fleet.steps.hooks.step_times import StepTimes
from fleet.steps.hooks.summary import RunSummary
from fleet.steps.hooks.tracing import StepSpans
from fleet.steps.hooks.usage import Usage
from fleet.steps.retries import RetryPolicy


@dataclass
class Runtime:
    """Agents, stores, the inference pool, the step bodies, the hooks and the retry policy of one
    worker process."""

    settings: Settings
    agents: dict[str, AgentDef]
    store: RunStore
    dead_letters: DeadLetters
    capacity: Capacity
    listener: Listener
    cancellation: Cancellation
    pool: InferencePool  # the default model's
    models: ModelCatalog
    bodies: StepBodies
    hooks: list[Hook]
    retries: RetryPolicy
    worker: str


def build_runtime(settings: Settings) -> Runtime:
    """Assemble a worker process's runtime: one Redis client, and every part handed what it
    needs. The hooks, in the order they are called (step spans only while this process traces:
    tracing off costs the step nothing)."""
    load_tool_modules(settings.tool_modules)
    client = redis_client(settings)
    store = RunStore(settings, client)
    capacity = Capacity(settings, client)
    listener = Listener(client)
    models = ModelCatalog(settings, client, listener)
    pool = models.pools[settings.triton_model]
    prices = Prices.from_settings(settings)
    spans: list[Hook] = [StepSpans()] if tracing.enabled() else []
    hooks: list[Hook] = [
        *spans, TerminalGuard(), KnownStepGuard(), DeadlineGuard(), BudgetGuard(prices), PoisonGuard(),
        StepTimes(capacity), Usage(UsageLedger(settings, client)), FairShare(Backlog(settings, client)),
        Metrics(settings.triton_model), SentryReports(), SessionTurns(Sessions(settings, client)), RunSummary(),
    ]
    return Runtime(
        settings=settings, agents=load_agents(settings.agents_dir), store=store,
        dead_letters=DeadLetters(settings, client), capacity=capacity, listener=listener,
        cancellation=Cancellation(store, listener), pool=pool,
        models=models, bodies=StepBodies(models, store, Formats(settings)), hooks=hooks,
        retries=RetryPolicy.from_settings(settings), worker=f"{socket.gethostname()}:{os.getpid()}",
    )


_built: dict[int, Runtime] = {}
_lock = threading.Lock()


def runtime_for(settings: Settings) -> Runtime:
    """This process's runtime, assembled on first use (a pool child after the fork builds its own)."""
    pid = os.getpid()
    found = _built.get(pid)
    if found is None:
        with _lock:
            found = _built.get(pid)
            if found is None:
                found = _built[pid] = build_runtime(settings)
    return found
