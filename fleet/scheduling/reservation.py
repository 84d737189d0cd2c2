"""What a submission took on its way through admission's gates, and what a refusal gives back.

Each gate that takes something (a tenant's quota places, a place in the ledger of admitted
runs, an idempotency key, a run record) records how to give it back on the
:class:`Reservation`. A submission that gets through commits it; a later gate that refuses (by
raising, or by answering a repeat) leaves it uncommitted, and everything taken is given back,
last taken first. One list of give-backs instead of a hand-written one on every path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Held:
    """Something a gate took: ``n`` units, of which ``keep`` marks those to keep."""

    def __init__(self, what: str, give_back: Callable[[int], None], n: int) -> None:
        self.what, self.give_back, self.n = what, give_back, n
        self.kept = 0

    def keep(self, n: int | None = None) -> None:
        """Keep ``n`` units (all when None): they are not given back."""
        self.kept = self.n if n is None else min(self.n, n)


class Reservation:
    """The give-backs of one admission, used as a context manager."""

    def __init__(self, what: str = "a submission") -> None:
        self.what = what
        self.held: list[Held] = []
        self.committed = False

    def took(self, what: str, give_back: Callable[[int], None], n: int = 1) -> Held:
        """Record that ``n`` units were taken and how to give back some of them."""
        held = Held(what, give_back, n)
        self.held.append(held)
        return held

    def commit(self) -> None:
        """The submission got through: keep everything that was not kept or given back yet."""
        for held in self.held:
            held.keep()
        self.committed = True

    def release(self) -> None:
        """Give back what is not kept, last taken first. A give-back that fails is logged: the
        failure that caused it is the caller's to see."""
        for held in reversed(self.held):
            left = held.n - held.kept
            if left <= 0:
                continue
            try:
                held.give_back(left)
            except Exception:  # noqa: BLE001 - never hide the refusal that led here
                log.warning("%s: could not give back %s (%d)", self.what, held.what, left, exc_info=True)
            held.kept = held.n
        self.held.clear()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.committed:
            self.release()
