"""The inference pool: the Triton server llm steps run on, and the slots they hold there.

A step body asks the pool for a generation; the pool holds an in-flight slot for it (batch
requests wait for one of ``FLEET_BATCH_INFLIGHT_MAX``, see :mod:`fleet.capacity`) and calls
Triton with the run's remaining budget, its class's priority and its cancel scope.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from fleet.cancel import CancelScope
from fleet.capacity import Capacity
from fleet.settings import PriorityClass, Settings
from fleet.triton import Generation, TritonClient


class InferencePool:
    """Model calls of one worker process."""

    def __init__(self, settings: Settings, capacity: Capacity) -> None:
        self.settings = settings
        self.capacity = capacity
        self._client: TritonClient | None = None

    @property
    def client(self) -> TritonClient:
        # Created on first use: tool workers never open a channel.
        if self._client is None:
            self._client = TritonClient(self.settings.triton_grpc_url, self.settings.triton_connect_wait_s)
        return self._client

    def generate(self, prompt: str, sampling: dict[str, Any], *, model: str | None, priority: PriorityClass,
                 deadline_at: float, request_id: str, cancel: CancelScope,
                 on_token: Callable[[str], None] | None = None) -> Generation:
        """One generation, within the run's deadline; raises per :mod:`fleet.errors`."""
        slot = (contextlib.nullcontext() if self.settings.scheduling == "vanilla"
                else self.capacity.slot(priority, deadline_at))
        # Interactive runs stream (time to first token, prompt cancellation); batch runs take
        # one response per request unless their tokens are wanted, which saves a message per
        # token in the worker and at Triton.
        stream = priority == "interactive" or on_token is not None
        with slot:
            return self.client.generate(
                prompt, sampling, stream=stream, model=model or self.settings.triton_model,
                priority=self.settings.triton_priority(priority), timeout_s=deadline_at - time.time(),
                request_id=request_id, on_token=on_token, cancelled=cancel.cancelled, bind=cancel.bind,
            )
