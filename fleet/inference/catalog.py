"""Models as a catalog: one inference pool per model the fleet serves, and the choice of the
model a step's call runs on.

The catalog is the default model (``FLEET_TRITON_MODEL``), the models in ``FLEET_MODELS`` and
those ``FLEET_MODEL_ROLES`` names (a step names a model or a role). Each model has its own
pool: its replicas (its ``replicas`` in ``FLEET_MODELS``, else the fleet's), its slots, its
replica board and its pool monitor, under a key namespace of its own
(:meth:`fleet.settings.Settings.for_model`), so capacity, slots, preemption and routing work
for each as they do for one; and its own prices.

**Fallback.** A step with a ``fallback`` runs its call on the fallback model when its own model
has no replica up, or when the predicted wait for a slot there would miss the run's deadline;
a call whose replicas all go away under it is sent to the fallback model. The step's record
names the model that served it (and whether it was the fallback).
"""

from __future__ import annotations

import logging
import math
import threading
import time

import redis

from fleet.core.listener import Listener
from fleet.errors import PermanentError
from fleet.inference.pool import InferencePool
from fleet.run.cost import Prices
from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)

#: Weight of the newest call in a model's running mean call time.
_EWMA = 0.2


class ModelCatalog:
    """The pools and prices of the fleet's models, in one worker process."""

    def __init__(self, settings: Settings, client: redis.Redis, listener: Listener) -> None:
        self.settings = settings
        self.redis = client
        self.pools = {name: InferencePool(settings.for_model(name), client, listener) for name in settings.catalog()}
        self.prices = {name: prices_of(settings, name) for name in self.pools}
        self._call_s: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return self.settings.triton_model

    def resolve(self, ref: str | None) -> str:
        """The model a step's ``model`` (a model or a role; None: the default) names."""
        return self.settings.resolve_model(ref)

    def pool(self, name: str) -> InferencePool:
        """The pool of a model of the catalog; another is a permanent error."""
        try:
            return self.pools[name]
        except KeyError:
            raise PermanentError(f"model {name!r} is not in the fleet's catalog ({', '.join(self.pools)})") from None

    def is_down(self, name: str) -> bool:
        """Whether every replica of the model's pool is known to be down."""
        states = self.pool(name).board.states()
        return bool(states) and all(st.known and not st.up for st in states)

    def observed(self, name: str, call_s: float) -> None:
        """A call of the model took ``call_s`` (its running mean call time follows)."""
        with self._lock:
            last = self._call_s.get(name)
            self._call_s[name] = call_s if last is None else (1 - _EWMA) * last + _EWMA * call_s

    def predicted_wait_s(self, name: str, priority: PriorityClass) -> float:
        """How long a call of this class would wait for a slot of the model now (infinite with
        no replica up; 0 while a slot is free or before any call was timed)."""
        pool = self.pool(name)
        states = pool.board.states()
        up = [st for st in states if st.up]
        if states and not up and all(st.known for st in states):
            return math.inf
        capacity = sum(st.capacity or 0 for st in up)
        held = sum(sum(st.inflight.values()) for st in up)
        waiting = int(self.redis.zcount(pool.settings.keys.slot_waiters(priority), time.time(), "+inf"))
        call_s = self._call_s.get(name)
        if call_s is None or capacity <= 0 or (held < capacity and not waiting):
            return 0.0
        return (max(0, held - capacity) + waiting + 1) / capacity * call_s

    def choose(self, model: str, fallback: str | None, priority: PriorityClass, deadline_at: float) -> str:
        """The model a step's call goes to: its own, or its fallback when its own has no replica
        up or its predicted wait plus a call would miss the deadline."""
        if fallback is None or fallback == model:
            return model
        wait = self.predicted_wait_s(model, priority)
        if math.isinf(wait):
            log.info("model %s has no replica up: falling back to %s", model, fallback)
            return fallback
        if time.time() + wait + self._call_s.get(model, 0.0) > deadline_at:
            log.info("model %s: predicted wait %.2fs would miss the deadline: falling back to %s", model, wait,
                     fallback)
            return fallback
        return model


def prices_of(settings: Settings, name: str) -> Prices:
    """A model's prices: its own in FLEET_MODELS where set, else the fleet's."""
    spec, base = settings.model_spec(name), Prices.from_settings(settings)
    return Prices(
        base.per_1k_input_tokens if spec.price_per_1k_input_tokens is None else spec.price_per_1k_input_tokens,
        base.per_1k_output_tokens if spec.price_per_1k_output_tokens is None else spec.price_per_1k_output_tokens,
        base.per_gpu_s if spec.price_per_gpu_s is None else spec.price_per_gpu_s,
    )
