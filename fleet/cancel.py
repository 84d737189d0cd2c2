"""Cancelling model calls in flight the moment a run is cancelled.

``FleetClient.cancel`` publishes the run id on a Redis channel; every inference worker
process listens on it and cancels the gRPC calls it has in flight for that run, so Triton
stops generating for nobody. Streaming calls also poll the run's status between tokens,
which covers a worker that was reconnecting when the message went out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from fleet.settings import Settings

log = logging.getLogger(__name__)


def channel(settings: Settings) -> str:
    """The channel cancelled run ids are published on."""
    return settings.key("cancel")


def announce(settings: Settings, client: redis.Redis, run_id: str) -> None:
    """Tell every worker that ``run_id`` was cancelled."""
    client.publish(channel(settings), run_id)


class CancelWatcher:
    """Holds the model calls in flight in this process, by run, and cancels them on demand."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self._calls: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def track(self, run_id: str, is_cancelled: Callable[[], bool]) -> Iterator[Callable[[Any], None]]:
        """Within this block, calls passed to the yielded function are cancelled with the run.

        ``is_cancelled`` is asked once a call is held, for a cancel published before that.
        """
        self._ensure_listening()
        held: list[Any] = []

        def bind(call: Any) -> None:
            with self._lock:
                held.append(call)
                self._calls.setdefault(run_id, []).append(call)
            if is_cancelled():
                call.cancel()

        try:
            yield bind
        finally:
            with self._lock:
                calls = self._calls.get(run_id, [])
                for call in held:
                    if call in calls:
                        calls.remove(call)
                if not calls:
                    self._calls.pop(run_id, None)

    def cancel(self, run_id: str) -> int:
        """Cancel this process's calls for ``run_id``; how many there were."""
        with self._lock:
            calls = list(self._calls.get(run_id, []))
        for call in calls:
            call.cancel()
        if calls:
            log.info("run %s: cancelled %d model call(s) in flight", run_id, len(calls))
        return len(calls)

    def _ensure_listening(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="fleet-cancel", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel(self.settings))
                while True:
                    # Poll with a timeout below the connection's read timeout: a quiet
                    # channel is not an error, a dead connection is.
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self.cancel(message["data"])
            except redis.RedisError:
                log.debug("cancel channel lost; resubscribing", exc_info=True)
                time.sleep(1.0)  # back off before resubscribing
