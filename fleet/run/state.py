"""A run as a step works from it: the run hash, typed (:class:`RunState`)."""

from __future__ import annotations

import json
from typing import Any

from fleet.run.codec import JOINED, JSON_FIELDS, OUT, SIGNAL, STEP
from fleet.run.records import TERMINAL, RunRecord, StepRecord, parse_step_key, step_key
from fleet.settings import PriorityClass
from fleet.tenants import DEFAULT_TENANT


class RunState:
    """A run as a step works from it: the run hash, typed.

    Attributes:
        fields: the run's own fields, decoded (input, status, deadline_at as a float, ...).
        outputs: step name -> iteration -> output (a parallel step's branches are its
            iterations 1..n, its joined output iteration 0).
        records: step key -> its record.
        signals: signal name -> payload, for signals delivered to the run.
    """

    def __init__(self, raw: dict[str, str]) -> None:
        fields: dict[str, Any] = {}
        self.outputs: dict[str, dict[int, Any]] = {}
        self.records: dict[str, StepRecord] = {}
        self.signals: dict[str, Any] = {}
        for name, value in raw.items():
            if name.startswith(OUT):
                step, iteration = parse_step_key(name[len(OUT):])
                self.outputs.setdefault(step, {})[iteration] = json.loads(value)
            elif name.startswith(STEP):
                self.records[name[len(STEP):]] = StepRecord.model_validate_json(value)
            elif name.startswith(SIGNAL):
                self.signals[name[len(SIGNAL):]] = json.loads(value)
            elif name.startswith(JOINED):
                continue
            else:
                fields[name] = value
        for name in JSON_FIELDS:
            if name in fields:
                fields[name] = json.loads(fields[name])
        for name in ("created_at", "deadline_at", "started_at", "finished_at", "budget_cost", "wait_until"):
            if name in fields:
                fields[name] = float(fields[name])
        if "budget_tokens" in fields:
            fields["budget_tokens"] = int(fields["budget_tokens"])
        fields["stream"] = fields.get("stream") == "1"
        self.fields = fields

    # --- the run's own fields ---------------------------------------------------------
    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def agent(self) -> str:
        return self.fields["agent"]

    @property
    def priority(self) -> PriorityClass:
        return self.fields["priority"]

    @property
    def status(self) -> str:
        return self.fields["status"]

    @property
    def tenant(self) -> str:
        return self.fields.get("tenant", DEFAULT_TENANT)

    @property
    def deadline_at(self) -> float:
        return self.fields["deadline_at"]

    @property
    def input(self) -> dict[str, Any]:
        return self.fields.get("input", {})

    @property
    def session_id(self) -> str | None:
        return self.fields.get("session_id")

    @property
    def stream(self) -> bool:
        """Whether the run's model tokens are published as events."""
        return self.fields["stream"]

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def budget_tokens(self) -> int | None:
        return self.fields.get("budget_tokens")

    @property
    def budget_cost(self) -> float | None:
        return self.fields.get("budget_cost")

    @property
    def traceparent(self) -> str | None:
        return self.fields.get("traceparent")

    # --- steps ------------------------------------------------------------------------
    def record(self, key: str) -> StepRecord | None:
        return self.records.get(key)

    def is_done(self, key: str) -> bool:
        """Whether the step's output is committed (done, or skipped)."""
        rec = self.records.get(key)
        return rec is not None and rec.finished

    def output(self, name: str, iteration: int = 0) -> Any:
        """A committed output, or None."""
        return self.outputs.get(name, {}).get(iteration)

    def iterations(self, names: set[str]) -> list[int]:
        """Iterations (above 0) in which any of these steps has a record, ascending."""
        found = {parse_step_key(k)[1] for k in self.records if parse_step_key(k)[0] in names}
        return sorted(i for i in found if i > 0)

    def committed(self, record: StepRecord, output: Any) -> None:
        """Apply a commit of this step to the state in hand."""
        self.records[record.key] = record
        self.outputs.setdefault(record.name, {})[record.iteration] = output

    def to_record(self) -> RunRecord:
        """The run as clients see it."""
        outputs = {step_key(name, it): value for name, by_it in self.outputs.items() for it, value in by_it.items()}
        steps = sorted(self.records.values(), key=lambda s: (s.started_at or 0.0, s.key))
        return RunRecord(**self.fields, outputs=outputs, steps=steps)


def decode_record(raw: dict[str, str]) -> RunRecord:
    """A run record from its Redis hash, as HGETALL returns it."""
    return RunState(raw).to_record()
