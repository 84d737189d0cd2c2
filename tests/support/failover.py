"""A steady mix of runs, and the census of their commits: what a failover test and the failover
benchmark measure the same way.

:class:`SteadyLoad` submits interactive and batch runs at fixed rates from a thread, each with an
idempotency key, and submits a key again until the fleet accepts it (a submission that lost
Redis in a failover may or may not have been admitted: the key makes the retry answer the same
run). Only accepted runs count: each was promised to its caller.

:func:`commit_census` reads every run's events: a step's commit writes exactly one ``step`` /
``done`` event in the same Lua call, so the events of a step key count its commits, and their
stream ids (the primary's clock, in ms) say when each happened.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import redis
from kombu.exceptions import OperationalError

from fleet.errors import Overloaded
from fleet.surfaces.client import FleetClient


@dataclass
class Accepted:
    run_id: str
    priority: str
    submitted_at: float  # when the fleet accepted it


@dataclass
class SteadyLoad:
    """Interactive and batch runs at ``interactive_per_s`` and ``batch_per_s`` until stopped."""

    client: FleetClient
    interactive_per_s: float
    batch_per_s: float
    interactive_agent: tuple[str, dict] = ("calculator", {"question": "What is {i} * 7?"})
    batch_agent: tuple[str, dict] = ("writer", {"topic": "failover {i}"})
    accepted: list[Accepted] = field(default_factory=list)
    retried: int = 0
    refused: int = 0
    failed: list[BaseException] = field(default_factory=list)
    trouble: list[tuple[float, str]] = field(default_factory=list)  # when a submission was retried, and why
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "SteadyLoad":
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(90)
            assert not self._thread.is_alive(), "the load's last submission did not return"

    def _run(self) -> None:
        try:
            self._submit_all()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there was none
            self.failed.append(exc)

    def _submit_all(self) -> None:
        plan = self._plan()
        started = time.monotonic()
        for i, (at, priority) in enumerate(plan):
            if self._stop.wait(max(0.0, started + at - time.monotonic())):
                return
            agent, template = self.interactive_agent if priority == "interactive" else self.batch_agent
            inp = {k: v.format(i=i) for k, v in template.items()}
            self._submit(agent, inp, priority, f"load-{uuid.uuid4().hex}")

    def _plan(self) -> list[tuple[float, str]]:
        """Submission times (s from the start) and classes, merged in time order: an hour's worth."""
        out = [(k / self.interactive_per_s, "interactive") for k in range(int(3600 * self.interactive_per_s))]
        if self.batch_per_s > 0:
            out += [(k / self.batch_per_s + 0.01, "batch") for k in range(int(3600 * self.batch_per_s))]
        return sorted(out)

    def _submit(self, agent: str, inp: dict, priority: str, key: str) -> None:
        give_up_at = time.monotonic() + 60
        while time.monotonic() < give_up_at:
            try:
                run_id = self.client.submit(agent, inp, priority=priority, idempotency_key=key)
            except Overloaded:
                self.refused += 1
                return
            except (redis.RedisError, OperationalError) as exc:  # Redis lost mid-submission: the same key again
                self.retried += 1
                self.trouble.append((time.time(), f"{type(exc).__name__}: {exc}"[:200]))
                time.sleep(0.2)  # the failover takes seconds; nothing announces its end
                continue
            self.accepted.append(Accepted(run_id, priority, time.time()))
            return
        raise AssertionError(f"submission {key} not accepted within 60s")

    def ids(self, priority: str | None = None) -> list[str]:
        return [a.run_id for a in self.accepted if priority is None or a.priority == priority]

    def accepted_after(self, moment: float) -> list[str]:
        """Runs accepted after ``moment``: their messages were all published after it."""
        return [a.run_id for a in self.accepted if a.submitted_at > moment]


@dataclass
class Census:
    """Commits per run and step key, with their times (s since the epoch)."""

    commits: dict[str, dict[str, list[float]]]

    def duplicates(self) -> int:
        """Commits beyond the first of a step (0: every step committed once)."""
        return sum(len(times) - 1 for steps in self.commits.values() for times in steps.values() if len(times) > 1)

    def total(self) -> int:
        return sum(len(times) for steps in self.commits.values() for times in steps.values())

    def first_after(self, moment: float, steps: set[str] | None = None) -> float | None:
        """The time of the first commit after ``moment`` (of a step named in ``steps``, when
        given; None when there was none)."""
        later = [t for by_step in self.commits.values() for key, times in by_step.items()
                 if steps is None or key.split("#")[0] in steps for t in times if t > moment]
        return min(later, default=None)

    def steps_redone(self, client: FleetClient, run_ids: list[str]) -> int:
        """Steps that were delivered more than once (their record's attempts)."""
        return sum(s.attempts > 1 for r in run_ids for s in client.get(r).steps)


def commit_census(client: FleetClient, run_ids: list[str]) -> Census:
    """Read every run's events: the ``done`` events of each step key."""
    out: dict[str, dict[str, list[float]]] = {}
    r = client.store.redis
    for i in range(0, len(run_ids), 200):
        chunk = run_ids[i:i + 200]
        pipe = r.pipeline(transaction=False)
        for run_id in chunk:
            pipe.xrange(client.settings.keys.events(run_id))
        for run_id, entries in zip(chunk, pipe.execute()):
            steps: dict[str, list[float]] = {}
            for entry_id, event in entries:
                if event.get("type") == "step" and event.get("status") == "done":
                    steps.setdefault(event["step"], []).append(int(entry_id.split("-")[0]) / 1000)
            out[run_id] = steps
    return Census(out)


def status_counts(client: FleetClient, run_ids: list[str]) -> Counter:
    return Counter(client.store.statuses(run_ids))
