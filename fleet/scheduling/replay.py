"""Replaying dead-lettered steps: re-run a run from its failed step with the stored state.

A replay reopens the run record (or rebuilds it from the entry when the record has
expired), applies an optional patch to the state (``{"input": {...}}`` merges into the
run's input, validated again; ``{"steps": {"plan": ...}}`` replaces an earlier step's
output), clears the failed step and everything after it, gives the run a fresh deadline,
and sends the rest of the chain. The entry records each replay; its outcome is read from
the run whenever the entry is shown.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from celery import Celery

from fleet.broker.chains import build_chain
from fleet.core import tracing
from fleet.errors import InvalidSubmission, RunNotFound
from fleet.run.agent import AgentDef
from fleet.run.deadletter import DeadLetter, DeadLetters
from fleet.run.plan import StepPos, next_step, remaining_steps
from fleet.run.records import RunRecord, step_key
from fleet.run.store import RunStore
from fleet.settings import Settings

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` in seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class Replayer:
    """Replays dead-letter entries of one fleet."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef],
                 store: RunStore, dead_letters: DeadLetters) -> None:
        self.settings, self.app, self.agents = settings, app, agents
        self.store, self.dead_letters = store, dead_letters
        self._replays = settings.keys.dead_letter_replays

    def replays(self, entry_id: str) -> list[dict[str, Any]]:
        """The replays of an entry, each with the run's current outcome."""
        raw = self.store.redis.hget(self._replays, entry_id)
        out = json.loads(raw) if raw else []
        for replay in out:
            try:
                run = self.store.get(replay["run_id"])
                replay["outcome"] = run.status
                if run.status == "dead_lettered" and run.dead_letter_id != entry_id:
                    replay["dead_letter_id"] = run.dead_letter_id
            except RunNotFound:
                replay["outcome"] = "expired_record"
        return out

    def is_open(self, entry: DeadLetter) -> bool:
        """Whether the entry's run still ends in this entry (not yet replayed successfully)."""
        try:
            run = self.store.get(entry.run_id)
        except RunNotFound:
            return not self.replays(entry.id)
        return run.status == "dead_lettered" and run.dead_letter_id == entry.id

    def replay(self, entry_id: str, patch: dict[str, Any] | None = None) -> str:
        """Replay one entry; returns the run id. Raises InvalidSubmission for a bad patch."""
        entry = self.dead_letters.get(entry_id)
        if entry is None:
            raise RunNotFound(f"no dead-letter entry '{entry_id}'")
        agent = self.agents.get(entry.agent)
        if agent is None:
            raise InvalidSubmission(f"agent '{entry.agent}' is no longer defined", "agent")
        patch = patch or {}
        unknown = set(patch) - {"input", "steps"}
        if unknown:
            raise InvalidSubmission(
                f"patch: unknown keys {sorted(unknown)}; use 'input' and/or 'steps'", "patch"
            )
        state_input = dict(entry.state.get("input", {}))
        state_input.update(patch.get("input", {}))
        clean = agent.validate_input(state_input)
        step_outputs: dict[str, Any] = dict(patch.get("steps", {}))
        for name in step_outputs:
            try:
                agent.step(name)
            except KeyError:
                raise InvalidSubmission(f"patch: agent '{agent.name}' has no step '{name}'",
                                        f"patch.steps.{name}") from None

        now = time.time()
        deadline = now + self.settings.deadline_s(entry.priority)
        rest = remaining_steps(agent, entry.step, entry.iteration)
        # The failed step and everything after it run again (a loop from this iteration on).
        rerun: dict[str, int] = {}
        for step, iteration in rest:
            rerun.setdefault(step.name, iteration)
        since = self.store.epoch()
        if self.store.exists(entry.run_id):
            reopened = self.store.reopen(entry.run_id, rerun, {"input": clean, "deadline_at": repr(deadline)},
                                         outputs=step_outputs)
            if not reopened:
                raise InvalidSubmission(
                    f"run {entry.run_id} is {self.store.status(entry.run_id)}: only a finished run can be replayed",
                    "run")
        else:
            self._recreate(entry, agent, clean, deadline, step_outputs)
        run = self.store.load(entry.run_id)
        start = next_step(agent, run)
        if not isinstance(start, StepPos):  # nothing left to run: the patch completed it
            start = StepPos(entry.step, entry.iteration)
        with tracing.resumed(run.traceparent, f"replay {agent.name}", {"fleet.run_id": entry.run_id}):
            build_chain(self.app, self.settings, agent, entry.run_id, entry.priority,
                        start=start.name, iteration=start.iteration, run=run).apply_async()
        # The replay is reported done next: the reopened record and its first step message must
        # be on a replica (a failover in between raises: the operator replays it again).
        self.store.replicated(f"run {entry.run_id}: replay", since)
        record = {"replayed_at": now, "patch": patch, "run_id": entry.run_id}
        history = json.loads(self.store.redis.hget(self._replays, entry_id) or "[]")
        self.store.redis.hset(self._replays, entry_id, json.dumps([*history, record]))
        log.info("run %s: replayed from step %s (dead letter %s)", entry.run_id, start.key, entry_id,
                 extra={"run_id": entry.run_id})
        return entry.run_id

    def _recreate(self, entry: DeadLetter, agent: AgentDef, clean: dict[str, Any], deadline: float,
                  step_outputs: dict[str, Any]) -> None:
        """A run whose record expired, made again from the entry: the steps before the failed
        one are marked done, each with its latest output (the entry keeps no older ones)."""
        record = RunRecord(id=entry.run_id, agent=entry.agent, priority=entry.priority, tenant=entry.tenant,
                           status="queued", created_at=time.time(), deadline_at=deadline, input=clean)
        later = {step_key(s.name, it) for s, it in remaining_steps(agent, entry.step, entry.iteration)}
        latest = {**entry.state.get("steps", {}), **step_outputs}
        done: list[str] = []
        outputs: dict[str, Any] = {}
        for step, loop in agent.iter_steps():
            in_failed_loop = loop is not None and loop is agent.loop_of(entry.step)
            iterations = range(1, entry.iteration + 1) if in_failed_loop else [1] if loop is not None else [0]
            keys = [step_key(step.name, it) for it in iterations if step_key(step.name, it) not in later]
            done += keys
            if keys and step.name in latest:
                outputs[keys[-1]] = latest[step.name]
        self.store.restore(record, outputs, done)

    def purge(self, older_than_s: float | None) -> int:
        """Delete entries older than ``older_than_s`` (all when None); returns how many."""
        stream = self.dead_letters.stream
        before = self.store.redis.xlen(stream)
        if older_than_s is None:
            self.store.redis.delete(stream, self._replays)
            return before
        min_id = f"{int((time.time() - older_than_s) * 1000)}-0"
        self.store.redis.xtrim(stream, minid=min_id, approximate=False)
        return before - self.store.redis.xlen(stream)
