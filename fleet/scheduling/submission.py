"""A submission: what an app asks for, in one model shared by both clients, the gateway (its
request body) and the CLI (its options), so the parameters are written once.

Everything that can be wrong with a submission's envelope is found here, before anything is
queued, and reported with a message that names the field (:class:`fleet.errors.InvalidSubmission`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.core.payload import check_value
from fleet.errors import FleetError, InvalidSubmission
from fleet.run.budget import MAX_BUDGET_COST, MAX_BUDGET_TOKENS
from fleet.settings import PriorityClass


def whole_number(value: Any) -> Any:
    """A float with no fractional part as the int it is; anything else unchanged (JSON Schema's
    ``integer`` takes 2.0, and a strict pydantic int refuses it)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


class Submission(BaseModel):
    """What an app asks for: a run of an agent, with its input and options."""

    # Strict: a value of another JSON type than the field's (0 for false, "5" for 5) is refused,
    # as the gateway's document says.
    model_config = ConfigDict(extra="forbid", strict=True)

    agent: str = Field(min_length=1, max_length=128, description="The agent to run.")
    input: dict[str, Any] = Field(default_factory=dict, description="The run's input, as the agent's schema says.")
    priority: PriorityClass = Field("interactive", description="interactive (a person waits) or batch.")
    deadline_s: float | None = Field(None, gt=0, le=7 * 86400,
                                     description="Seconds from now the run must finish in; overrides the class default.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=256,
        description="Names one submission: the same key again returns the same run (another body is refused).")
    session_id: str | None = Field(None, min_length=1, max_length=256,
                                   description="Runs of one session see its earlier turns.")
    stream: bool = Field(False, description="Publish model tokens as run events.")
    budget_tokens: int | None = Field(
        None, gt=0, le=MAX_BUDGET_TOKENS,
        description="Most tokens (in + out) the run's model calls may use; overrides the agent's budget.")
    budget_cost: float | None = Field(
        None, gt=0, le=MAX_BUDGET_COST, allow_inf_nan=False,
        description="Most estimated cost (FLEET_PRICE_*) the run's model calls may use; overrides the agent's.")

    @field_validator("budget_tokens", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        # JSON has one number type: 2000.0 is the integer 2000 (a bool or a string is not).
        return whole_number(value)

    @field_validator("input", mode="before")
    @classmethod
    def _carryable(cls, value: Any) -> Any:
        check_value(value, "input")  # deep nesting, lone surrogates, NUL, overflowing numbers
        return value


#: The options of a submission besides the agent and its input (the clients' keyword arguments,
#: the CLI's options).
OPTIONS: tuple[str, ...] = tuple(name for name in Submission.model_fields if name not in ("agent", "input"))


def parse_submission(data: dict[str, Any]) -> Submission:
    """Validate the envelope of a submission; :class:`InvalidSubmission` names the field."""
    try:
        return Submission.model_validate(data)
    except InvalidSubmission:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "submission"
        raise InvalidSubmission(f"{field}: {err['msg']}", field) from None


def submission(agent: str, input: dict[str, Any] | None = None, **options: Any) -> Submission:
    """A submission from a client's arguments (``options``: :data:`OPTIONS`), checked."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidSubmission(f"{unknown[0]}: not an option of a submission (options: {', '.join(OPTIONS)})",
                                unknown[0])
    return parse_submission({"agent": agent, "input": input if input is not None else {}, **options})


def fingerprint(sub: Submission) -> str:
    """What makes two submissions the same run: everything but the idempotency key, hashed."""
    body = sub.model_dump(exclude={"idempotency_key"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Admitted:
    """One item of a bulk submission: its run, or why it was not admitted."""

    run_id: str | None = None
    created: bool = False
    error: FleetError | None = None
