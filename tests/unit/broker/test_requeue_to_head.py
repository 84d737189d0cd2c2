"""A step that gave its borrowed thread back is requeued at the end of its list the Redis transport
pops next; every other rejection is kombu's own."""

from __future__ import annotations

from fleet.broker import consumer


class FakeQoS:
    def __init__(self) -> None:
        self.restored: list[tuple[str, bool]] = []
        self.acked: list[str] = []

    def restore_by_tag(self, tag: str, leftmost: bool = False) -> None:
        self.restored.append((tag, leftmost))

    def _quick_ack(self, tag: str) -> None:
        self.acked.append(tag)


class FakeChannel:
    def __init__(self) -> None:
        self.qos = FakeQoS()


class FakeMessage:
    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.delivery_tag = "tag-1"
        self._state = "RECEIVED"
        self.rejected: list[bool] = []

    def reject(self, requeue: bool = False) -> None:
        self.rejected.append(requeue)


def test_a_handed_back_step_goes_to_the_head_and_others_as_kombu_does():
    message = FakeMessage()
    consumer.TO_THE_HEAD.add("task-1")
    consumer._reject(message, message.reject, "task-1", requeue=True)
    assert message.channel.qos.restored == [("tag-1", False)]  # rpush: the end BRPOP takes next
    assert message.channel.qos.acked == ["tag-1"] and message._state == "REJECTED"
    assert message.rejected == [] and "task-1" not in consumer.TO_THE_HEAD

    other = FakeMessage()
    consumer._reject(other, other.reject, "task-2", requeue=True)
    consumer._reject(other, other.reject, "task-2")
    assert other.rejected == [True, False] and other.channel.qos.restored == []
