"""The gateway's request and response bodies, and the path parameters it checks."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.run.deadletter import DeadLetter
from fleet.run.index import RUN_REF_PATTERN
from fleet.run.jobs import BATCH_ID_PATTERN
from fleet.run.records import RunStatus
from fleet.scheduling.submission import whole_number

# A Redis stream id ("<ms>-<seq>", or "<ms>"): anything else would make XREAD fail.
STREAM_ID = r"^\d{1,20}(-\d{1,20})?$"

RunId = Annotated[str, Path(pattern=RUN_REF_PATTERN, description=(
    "A run id (32 hex digits), or its first 6 or more hex digits when they start the id of one run "
    "the caller may see."))]
EntryId = Annotated[str, Path(pattern=STREAM_ID, description="A dead-letter entry id (<ms>-<seq>).")]


class SubmitResponse(BaseModel):
    """The run a submission created, or the run its idempotency key already names."""

    run_id: str
    status: RunStatus | None = Field(description="Null when the run's record is no longer kept.")
    created: bool = Field(description="False for a repeated idempotency key.")
    trace_id: str | None = Field(None, description="The run's trace id, when the fleet traces.")


class CancelResponse(BaseModel):
    """The outcome of a cancel."""

    run_id: str
    cancelled: bool = Field(description="False when the run had already ended.")
    status: RunStatus


class SignalResponse(BaseModel):
    """The outcome of a signal."""

    run_id: str
    signal: str
    outcome: Literal["resumed", "kept", "ended"] = Field(
        description="resumed: the run was waiting for it and goes on; kept: a wait to come will find it; "
        "ended: the run had ended.")
    status: RunStatus


class SessionView(BaseModel):
    session_id: str
    turns: list[dict[str, Any]] = Field(description="Each finished run's input and result, oldest first.")


class DeadLetterList(BaseModel):
    entries: list[DeadLetter]


class DeadLetterView(BaseModel):
    entry: DeadLetter
    replays: list[dict[str, Any]] = Field(description="Each replay with its run's current outcome.")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    patch: dict[str, Any] | None = Field(None, description='{"input": {...}} and/or {"steps": {name: output}}.')


class ReplayResponse(BaseModel):
    run_id: str


MAX_BATCH_ITEMS = 10_000


class BatchItem(BaseModel):
    """One input of a batch, with the caller's id for it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | int | None = Field(None, description="The caller's id of the item (makes its run unique in the batch).")
    input: dict[str, Any]

    @field_validator("id", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        return whole_number(value)


class BatchRequest(BaseModel):
    """A batch of runs of one agent, at batch priority: ``inputs``, or ``items`` with ids."""

    # The document says what the validator below checks: one of the two lists, not both.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"anyOf": [
        {"required": ["inputs"], "properties": {"inputs": {"type": "array"}, "items": {"type": "null"}}},
        {"required": ["items"], "properties": {"items": {"type": "array"}, "inputs": {"type": "null"}}}]})

    agent: str = Field(min_length=1, max_length=128)
    inputs: list[dict[str, Any]] | None = Field(None, max_length=MAX_BATCH_ITEMS)
    items: list[BatchItem] | None = Field(None, max_length=MAX_BATCH_ITEMS)
    batch_id: str | None = Field(
        None, pattern=BATCH_ID_PATTERN,
        description="Submitting again under the same id returns the same runs; a fresh id when unset.")
    deadline_s: float | None = Field(None, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _one_list(self) -> "BatchRequest":
        if (self.inputs is None) == (self.items is None):
            raise ValueError("give either inputs or items")
        return self

    def entries(self) -> list[BatchItem]:
        if self.items is not None:
            return self.items
        return [BatchItem(input=value) for value in self.inputs or []]


class BatchItemError(BaseModel):
    """An item that was not admitted, and why."""

    index: int
    id: str | int | None = None
    error: str
    field: str | None = None


class BatchResponse(BaseModel):
    """The runs of a batch, in the order of its items (null where an item was not admitted)."""

    batch_id: str
    run_ids: list[str | None]
    created: int = Field(description="Runs created by this request (the others already existed).")
    errors: list[BatchItemError]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    redis: bool
    triton_model: bool
    model: str
