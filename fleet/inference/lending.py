"""Batch steps on threads lent by interactive work (``FLEET_INFERENCE_BORROW``).

The interactive-only inference worker keeps threads that a batch backlog can never occupy, and
they sit idle whenever few people wait. With borrowing on, that worker also consumes the batch
queue (after its interactive one, so an idle thread always takes interactive work first), and
its :class:`Lender` watches the interactive queue while batch calls run on its threads: the
moment an interactive step waits there, the youngest borrowed call is cancelled at Triton (the
engine frees its sequence at its next step), its step goes back to the batch queue with no
attempt spent (:class:`fleet.errors.HandedBack`), at the head of the batch queue
(:data:`fleet.broker.consumer.TO_THE_HEAD`), and the freed thread takes the interactive step.
The step runs again from the start and is committed once.
"""

from __future__ import annotations

import logging
import time

import redis

from fleet.core.loops import BackgroundLoop
from fleet.inference.pool import InferencePool

log = logging.getLogger(__name__)

#: How often the interactive queue is looked at while batch calls run on borrowed threads.
LOOK_S = 0.02
#: After a thread is taken back, the next is left alone this long: the freed thread takes the
#: waiting step meanwhile (the queue still shows it until then).
SETTLE_S = 0.25


class Lender:
    """Takes a borrowed thread back as soon as an interactive step waits in ``queue``."""

    def __init__(self, client: redis.Redis, pool: InferencePool, queue: str) -> None:
        self.client = client
        self.pool = pool
        self.queue = queue
        self.taken_back = 0
        self._quiet_until = 0.0

    def tick(self) -> bool:
        """One look: hands back the youngest borrowed call when interactive work waits."""
        now = time.monotonic()
        if now < self._quiet_until or not self.pool.borrowed():
            return False
        if self.client.llen(self.queue) > 0 and self.pool.hand_back_youngest():
            self.taken_back += 1
            self._quiet_until = now + SETTLE_S
        return False

    def loop(self) -> BackgroundLoop:
        """The watch, every :data:`LOOK_S` (Redis away: quietly looked at again next time)."""
        return BackgroundLoop("fleet-lender", self.tick, LOOK_S, failure_level=logging.DEBUG)
