"""Cancelling a run's work in flight: one mechanism, one Redis read path.

``FleetClient.cancel`` moves the run to ``cancelled`` and publishes its id on the cancel
channel. Every worker process keeps one :class:`Cancellation`, which hears that channel
through the process's :class:`~fleet.core.listener.Listener` (started with the first model
call) and cancels the calls a cancelled run has in flight here, so Triton stops
generating for nobody. A step body sees cancellation through its
:class:`CancelScope`: ``cancelled()`` is true once the message arrived, and otherwise reads
the run's status (at most every ``poll_s``), which covers a worker that was reconnecting
when the message went out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fleet.core.listener import Listener
from fleet.run.store import RunStore

log = logging.getLogger(__name__)


def announce(store: RunStore, run_id: str) -> None:
    """Tell every worker that ``run_id`` was cancelled."""
    store.redis.publish(store.keys.cancel_channel, run_id)


class CancelScope:
    """Cancellation as one step of one run sees it."""

    def __init__(self, owner: "Cancellation", run_id: str, poll_s: float) -> None:
        self.owner, self.run_id, self.poll_s = owner, run_id, poll_s
        self.calls: list[Any] = []
        self._heard = False
        self._read_at = float("-inf")
        self._read = False

    def cancelled(self) -> bool:
        """Whether the run was cancelled (the channel said so, or its status, read at most
        every ``poll_s``)."""
        if self._heard:
            return True
        now = time.monotonic()
        if now - self._read_at >= self.poll_s:
            self._read_at = now
            self._read = self.owner.store.status(self.run_id) == "cancelled"
        return self._read

    def bind(self, call: Any) -> None:
        """Cancel ``call`` (anything with ``cancel()``) when the run is cancelled; at once if it was."""
        self.owner.listen()
        with self.owner.lock:
            self.calls.append(call)
        if self.cancelled():
            call.cancel()

    def hear(self) -> int:
        """The channel said the run was cancelled: cancel its calls; how many there were."""
        self._heard = True
        with self.owner.lock:
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        return len(calls)


class Cancellation:
    """What the cancel channel means to one worker process: the scopes of its steps."""

    def __init__(self, store: RunStore, listener: Listener, poll_s: float = 0.1) -> None:
        self.store = store
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self._scopes: dict[str, list[CancelScope]] = {}
        self._listener = listener
        listener.on(store.keys.cancel_channel, self.cancel)

    @contextmanager
    def scope(self, run_id: str) -> Iterator[CancelScope]:
        """The cancellation of one step of ``run_id`` while it runs here."""
        scope = CancelScope(self, run_id, self.poll_s)
        with self.lock:
            self._scopes.setdefault(run_id, []).append(scope)
        try:
            yield scope
        finally:
            with self.lock:
                scopes = self._scopes.get(run_id, [])
                if scope in scopes:
                    scopes.remove(scope)
                if not scopes:
                    self._scopes.pop(run_id, None)

    def cancel(self, run_id: str) -> int:
        """Cancel this process's calls for ``run_id``; how many there were."""
        with self.lock:
            scopes = list(self._scopes.get(run_id, []))
        n = sum(scope.hear() for scope in scopes)
        if n:
            log.info("run %s: cancelled %d model call(s) in flight", run_id, n)
        return n

    def listen(self) -> None:
        """Make sure the process hears the cancel channel."""
        self._listener.start()
