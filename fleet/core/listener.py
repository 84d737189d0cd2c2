"""One pub/sub connection per worker process, shared by everything that listens.

Handlers are registered per channel before the listener starts (the cancel channel,
the preempt channel, the slot channel); the first model call starts it. A handler runs on
the listener's thread and must be quick. A message published while the connection was
being re-established is missed: every listener also has a slower way to learn the same
thing (a run's status, a lease that is gone, a waiter's periodic retry).

Behind Sentinels, a subscription must follow the primary: messages are published there, but a
demoted primary keeps serving a subscriber without an error. So every few seconds the listener
asks the Sentinels where the primary is, and subscribes there again when it moved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from fleet.connections import primary_address

log = logging.getLogger(__name__)


#: How often a listener behind Sentinels checks that it listens to the primary.
CHECK_PRIMARY_S = 2.0


class Listener:
    """Dispatches the messages of the registered channels to their handlers."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call ``handler(message)`` for each message of ``channel`` (register before start)."""
        if self._thread is not None:
            raise RuntimeError(f"listener already started; cannot add channel {channel}")
        self._handlers[channel] = handler

    def start(self) -> None:
        """Start listening (once per process; later calls do nothing)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fleet-listener", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*self._handlers)
                self._listen(pubsub)
            except redis.RedisError:
                log.debug("pub/sub connection lost; subscribing again", exc_info=True)
                time.sleep(0.5)  # back off before subscribing again
            finally:
                pubsub.close()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Dispatch messages until the primary is elsewhere (then return) or the connection fails."""
        checked = time.monotonic()
        while True:
            # Poll with a timeout below the connection's read timeout: a quiet
            # channel is not an error, a dead connection is.
            message = pubsub.get_message(timeout=1.0)
            if message and message.get("type") == "message":
                self._dispatch(message["channel"], message["data"])
            if time.monotonic() - checked >= CHECK_PRIMARY_S:
                checked = time.monotonic()
                if self._moved(pubsub):
                    return

    def _moved(self, pubsub: redis.client.PubSub) -> bool:
        """Whether the Sentinels name another primary than the one this subscription is on."""
        primary = primary_address(self.redis)
        conn = pubsub.connection
        if primary is None or conn is None:
            return False
        if (conn.host, int(conn.port)) == primary:
            return False
        log.warning("pub/sub: the primary is now %s:%d (was %s:%s); subscribing there", *primary, conn.host, conn.port)
        return True

    def _dispatch(self, channel: str, data: str) -> None:
        handler = self._handlers.get(channel)
        if handler is None:
            return
        try:
            handler(data)
        except Exception:  # noqa: BLE001 - one bad message must not stop the listener
            log.exception("handler of %s failed on %r", channel, data)
