"""The inference pool: the Triton replicas llm steps run on, and how a model call uses them.

A step body asks the pool for a generation. The pool takes a slot on the replica its router
chooses (:mod:`fleet.inference.slots`; by default the one expected to hold the prompt's prefix in
its KV cache, within a load bound: :mod:`fleet.inference.routing`), calls Triton there with the run's remaining budget, its
class's priority and its cancel scope, and gives the slot back. Two things may happen in
between, and neither costs the step an attempt:

- **preempted**: an interactive request found the pool full and took this batch request's
  slot. The call is cancelled at Triton (the engine frees the sequence at its next step),
  and the request waits for a slot again and is sent from the start: its partial output is
  dropped, so what it finally returns is exactly what an unpreempted call returns (the
  youngest batch request is the one preempted, so little work is lost).
- **replica lost**: the replica cannot be reached. It is marked down for the whole fleet,
  and the request goes to another replica; the pool monitor brings it back when it answers.

With ``FLEET_SCHEDULING=vanilla`` (benchmarks only) there are no slots: calls go to the
replicas in turn.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from fleet.core.listener import Listener
from fleet.errors import HandedBack, ReplicaUnavailable, RunCancelled
from fleet.inference.replicas import ReplicaBoard, check
from fleet.inference.routing import RouteRequest, prefix_blocks
from fleet.inference.slots import Lease, Slots
from fleet.inference.triton import Generation, TritonClient
from fleet.run.cancel import CancelScope
from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)


class _Call:
    """One request's link to its gRPC call, so that a preemption can cancel it."""

    def __init__(self) -> None:
        self.preempted = False
        self.handed_back = False  # a borrowed thread taken back (preempted too)
        self._call: Any = None
        self._lock = threading.Lock()

    def bind(self, call: Any) -> None:
        with self._lock:
            self._call = call
            preempted = self.preempted
        if preempted:
            call.cancel()

    def preempt(self) -> None:
        with self._lock:
            self.preempted = True
            call = self._call
        if call is not None:
            call.cancel()

    def hand_back(self) -> None:
        self.handed_back = True
        self.preempt()


class InferencePool:
    """Model calls of one worker process over the pool's replicas."""

    def __init__(self, settings: Settings, client: redis.Redis, listener: Listener) -> None:
        self.settings = settings
        self.specs = {r.name: r for r in settings.replicas()}
        self.slots = Slots(settings, client)
        self.board = ReplicaBoard(settings, client)
        self._listener = listener
        self._clients: dict[str, TritonClient] = {}
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._checked = False
        self._turn = itertools.count()
        #: Batch calls run on threads borrowed from interactive work (FLEET_INFERENCE_BORROW), by token:
        #: when they started and their link.
        self.borrowing = False
        self._borrowed: dict[str, tuple[float, _Call]] = {}
        listener.on(settings.keys.preempt_channel, self._preempt)
        listener.on(settings.keys.slot_channel, self._slot_news)

    def client(self, replica: str) -> TritonClient:
        """The channel to one replica (created on first use: tool workers never open one)."""
        with self._lock:
            found = self._clients.get(replica)
            if found is None:
                found = TritonClient(self.specs[replica].grpc_url, self.settings.triton_connect_wait_s)
                self._clients[replica] = found
            return found

    def generate(self, prompt: str, sampling: dict[str, Any], *, model: str | None, priority: PriorityClass,
                 deadline_at: float, request_id: str, cancel: CancelScope,
                 on_token: Callable[[str], None] | None = None, token_ids: list[int] | None = None,
                 affinity: str = "") -> Generation:
        """One generation, within the run's deadline; raises per :mod:`fleet.errors`. ``affinity``
        (the session's or run's id) keeps a conversation on one replica under 'session' routing."""
        # Interactive runs stream (time to first token, prompt cancellation); batch runs take
        # one response per request unless their tokens are wanted, which saves a message per
        # token in the worker and at Triton.
        stream = priority == "interactive" or on_token is not None

        def call(replica: str, bind: Callable[[Any], None],
                 first_token: Callable[[], None] | None = None) -> Generation:
            tokens = on_token
            if first_token is not None:
                seen = [False]

                def tokens(text: str) -> None:
                    if not seen[0]:
                        seen[0] = True
                        first_token()
                    if on_token is not None:
                        on_token(text)

            return self.client(replica).generate(
                prompt, sampling, stream=stream, model=model or self.settings.triton_model,
                priority=self.settings.triton_priority(priority), timeout_s=deadline_at - time.time(),
                token_ids=token_ids, request_id=request_id, on_token=tokens, cancelled=cancel.cancelled, bind=bind,
            )

        if self.settings.scheduling == "vanilla":
            names = list(self.specs)
            return call(names[next(self._turn) % len(names)], cancel.bind)
        self._listener.start()
        self._check_unknown()
        route = RouteRequest(affinity, prefix_blocks(model or self.settings.triton_model, prompt, token_ids))
        # A batch call whose tokens stream to the app is never preempted: its tokens are out.
        preemptible = on_token is None
        preemptions = failovers = 0
        waited = 0.0
        while True:
            token, link = uuid.uuid4().hex, _Call()
            with self._lock:
                self._calls[token] = link
                if self.borrowing and priority == "batch":
                    self._borrowed[token] = (time.monotonic(), link)
            try:
                started = time.monotonic()
                lease = self._lease(priority, deadline_at, cancel, link, preemptible, token, route, request_id)
                waited += time.monotonic() - started
                try:
                    gen = call(lease.replica, lambda c: (cancel.bind(c), link.bind(c)),
                               (lambda: self.slots.started(lease)) if priority == "interactive" else None)
                except Exception as exc:
                    again = self._send_again(exc, link, lease.replica, request_id, failovers)
                    if again is None:
                        raise
                    preemptions, failovers = preemptions + (again == "preempted"), failovers + (again == "failover")
                    continue
                finally:
                    self.slots.release(lease)
            finally:
                with self._lock:
                    self._calls.pop(token, None)
                    self._borrowed.pop(token, None)
            gen.replica, gen.preemptions, gen.failovers, gen.slot_wait_s = (
                lease.replica, preemptions, failovers, waited)
            gen.route, gen.hit_blocks, gen.prompt_blocks = lease.reason, lease.hit_blocks, len(route.blocks)
            return gen

    def _lease(self, priority: PriorityClass, deadline_at: float, cancel: CancelScope, link: _Call,
               preemptible: bool, token: str, route: RouteRequest, request_id: str) -> Lease:
        """A slot for the call, waiting as long as the run may (or until its thread is taken back)."""
        try:
            return self.slots.acquire(priority, deadline_at, lambda: cancel.cancelled() or link.handed_back,
                                      preemptible, token=token, route=route)
        except RunCancelled:
            if link.handed_back and not cancel.cancelled():
                raise HandedBack(f"request {request_id}: its thread went back to interactive work") from None
            raise

    def _send_again(self, exc: Exception, link: _Call, replica: str, request_id: str, failovers: int) -> str | None:
        """Why a failed call is sent again (``'preempted'``, ``'failover'``), or None: it failed.

        Raises:
            HandedBack: the call ran on a borrowed thread, which interactive work took back.
        """
        if link.handed_back:
            log.info("request %s: cancelled at %s, its thread going back to interactive work", request_id, replica)
            raise HandedBack(f"request {request_id}: its thread went back to interactive work") from None
        if link.preempted:
            log.info("request %s preempted at %s for an interactive request; sending it again", request_id, replica)
            return "preempted"
        if isinstance(exc, ReplicaUnavailable) and failovers < 2 * len(self.specs):
            self.board.mark_down(replica, str(exc))
            log.warning("request %s: replica %s lost (%s); sending it to another replica", request_id, replica, exc)
            return "failover"
        return None

    # --- borrowed threads ---------------------------------------------------------------
    def borrowed(self) -> int:
        """Batch calls of this process running on threads borrowed from interactive work."""
        with self._lock:
            return sum(1 for _, link in self._borrowed.values() if not link.handed_back)

    def hand_back_youngest(self) -> bool:
        """Cancel the youngest borrowed batch call (its step goes back to its queue); False when none."""
        with self._lock:
            live = [(started, link) for started, link in self._borrowed.values() if not link.handed_back]
        if not live:
            return False
        max(live, key=lambda item: item[0])[1].hand_back()
        return True

    # --- what the listener hears ----------------------------------------------------------
    def _preempt(self, token: str) -> None:
        with self._lock:
            link = self._calls.get(token)
        if link is not None:
            link.preempt()

    def _slot_news(self, message: str) -> None:
        # "<replica>": a slot freed there; "up:<replica>": it came back, everyone may try.
        self.slots.signal.wake(message.removeprefix("up:"), everyone=message.startswith("up:"))

    def _check_unknown(self) -> None:
        """Probe, once per process, the replicas nobody has probed yet (a new fleet), so the
        first call does not wait for the monitor."""
        if self._checked:
            return
        for state in self.board.states():
            if not state.known:
                check(self.settings, self.board, self.specs[state.name], self.client(state.name))
        self._checked = True
