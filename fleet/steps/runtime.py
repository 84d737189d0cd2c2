"""What a worker process needs to run steps, built once per process (after fork)."""

from __future__ import annotations

import os
import socket

from fleet.run.agent import AgentDef, load_agents
from fleet.run.cancel import Cancellation
from fleet.scheduling.capacity import Capacity
from fleet.run.deadletter import DeadLetters
from fleet.steps.hooks import Hook, default_hooks
from fleet.core.listener import Listener
from fleet.inference.pool import InferencePool
from fleet.steps.retries import RetryPolicy
from fleet.run.records import RunStore
from fleet.settings import Settings
from fleet.run.tools import load_tool_modules


class Runtime:
    """Agents, stores, the inference pool, the hooks and the retry policy of one worker process."""

    def __init__(self, settings: Settings, hooks: list[Hook] | None = None) -> None:
        self.settings = settings
        load_tool_modules(settings.tool_modules)
        self.agents: dict[str, AgentDef] = load_agents(settings.agents_dir)
        self.store = RunStore(settings)
        self.dead_letters = DeadLetters(settings, self.store.redis)
        self.capacity = Capacity(settings, self.store.redis)
        self.listener = Listener(self.store.redis)
        self.cancellation = Cancellation(self.store, self.listener)
        self.pool = InferencePool(settings, self.store.redis, self.listener)
        self.retries = RetryPolicy.from_settings(settings)
        self.hooks = default_hooks() if hooks is None else hooks
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
