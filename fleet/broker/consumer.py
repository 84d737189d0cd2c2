"""The worker's consumer of the broker, reconnecting at the pace of a failover and surviving it.

When the worker loses the broker, Celery restarts its consumer and connects again through
kombu, which waits 2 s, then 4 s, then 6 s ... between rounds of attempts (one attempt per
Sentinel). A Sentinel failover takes a few seconds, and the attempts that come before its end
fail (the dead primary refuses, then the Sentinels know no primary): with kombu's pace the
consumers came back 12 s after the primary's death while the promoted replica had been
serving for 8. This consumer tries every half second instead, for as long as kombu would.

Steps in flight when the connection is lost go on (their own Redis commands wait for the
promoted replica), and finish after the consumer has reconnected. Their acknowledgement (or
rejection) then goes to the channel they came by, whose transport Celery released when it
dropped the connection: kombu raised an ``AttributeError`` there, and the worker exited (so did
the channel's attempt, on close, to put its unacknowledged messages back). The index of
unacknowledged messages is one hash in Redis, whichever connection reads it: so those calls go
through the consumer's new connection instead, and with none yet they fail as a lost connection
does (logged; the message comes back after the visibility timeout, and its step, committed once,
is not run again). A message handed back (a step that lost Redis, a pool child killed) is put back
from the worker's own copy: the failover may have lost its entry in that index (kombu writes it
in a round trip after the pop), and kombu, which puts a message back from the entry, would then
put back nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import redis
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import virtual

#: Seconds between rounds of connection attempts (a round asks every Sentinel once).
RECONNECT_INTERVAL_S = 0.5
#: Ids of step tasks whose message, when rejected to be requeued, goes to the head of its queue
#: rather than to its end: a step that gave its borrowed thread back to interactive work
#: (:mod:`fleet.inference.lending`) is the next one a thread takes. The task adds its id before it
#: rejects, in the process that received the message.
TO_THE_HEAD: set[str] = set()


class Consumer(CeleryConsumer):
    """Celery's consumer: a steady, short pause between reconnection attempts, and messages of a
    lost connection acknowledged through the new one."""

    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection
        conn.ensure_connection = functools.partial(ensure, interval_start=RECONNECT_INTERVAL_S,
                                                   interval_step=0, interval_max=RECONNECT_INTERVAL_S)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the connection's own method again

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        transport = getattr(self.connection, "_transport", None)
        for channel in list(getattr(transport, "channels", None) or []):
            channel.do_restore = False  # not through a transport about to be released
            channel.basic_ack = self._ack
            channel.basic_reject = functools.partial(self._reject, channel.qos)
        super().on_connection_error_after_connected(exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            task_id = (message.headers or {}).get("id")
            if task_id is not None:
                message.reject = functools.partial(_reject, message, message.reject, task_id)
            return handle(message)

        return on_task_received

    def _qos(self) -> Any:
        """The unacknowledged-message bookkeeping of the current connection."""
        conn = self.connection
        if conn is None or not conn.connected:
            raise redis.exceptions.ConnectionError(
                "the broker connection this message came by is gone and no other is up yet; "
                "it comes back after the visibility timeout")
        return conn.default_channel.qos

    def _ack(self, delivery_tag: Any, multiple: bool = False) -> None:  # noqa: ARG002 - kombu's signature
        self._qos()._remove_from_indices(delivery_tag).execute()

    def _reject(self, lost_qos: Any, delivery_tag: Any, requeue: bool = False) -> None:
        qos = self._qos()
        message = lost_qos._delivered.get(delivery_tag) if requeue else None
        with qos.channel.conn_or_acquire() as client:
            pipe = client.pipeline()  # one transaction: out of the index, back in its queue
            qos._remove_from_indices(delivery_tag, pipe)
            if message is not None:
                info = message.delivery_info
                qos.channel._do_restore_message(message._raw, info["exchange"], info["routing_key"], pipe,
                                                leftmost=True)
            pipe.execute()


def _reject(message: Any, reject: Any, task_id: str, requeue: bool = False) -> None:
    """``message.reject``, except that a message of :data:`TO_THE_HEAD` goes back to the end of its
    list that the Redis transport pops next (it pushes new messages to the other end)."""
    restore = getattr(message.channel.qos, "restore_by_tag", None)
    if not (requeue and task_id in TO_THE_HEAD) or restore is None:
        reject(requeue=requeue)
        return
    TO_THE_HEAD.discard(task_id)
    restore(message.delivery_tag, leftmost=False)
    virtual.QoS.ack(message.channel.qos, message.delivery_tag)  # out of the delivered set, as a reject does
    message._state = "REJECTED"
