"""What a run and an agent look like from outside: the views the HTTP gateway answers and
the CLI prints with ``--json``, built in one place so the two never drift."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model

from fleet.agent import AgentDef
from fleet.runs import RunRecord
from fleet.timeline import Timeline, timeline

# A run id as :func:`fleet.runs.new_run_id` makes them: anything else names no run.
RUN_ID_PATTERN = r"^[0-9a-f]{32}$"

# The run record as stored, plus what is derived from it (kept in step with RunRecord).
RunView = create_model(
    "RunView",
    __doc__="A run: its record, its latency once finished, its token counts and cost, and its timeline.",
    **{name: (f.annotation, f) for name, f in RunRecord.model_fields.items()},
    latency_s=(float | None, Field(None, description="Submission to finish, once finished.")),
    tokens_in=(int, Field(0, description="Prompt tokens over all steps.")),
    tokens_out=(int, Field(0, description="Generated tokens over all steps.")),
    cost=(float, Field(0.0, description="Estimated cost of the run's model calls (FLEET_PRICE_*).")),
    trace_id=(str | None, Field(None, description="The run's trace id, when traced.")),
    timeline=(Timeline, Field(description="Where the run's time went, step by step (fleet.timeline).")),
)


def run_view(run: RunRecord) -> dict[str, Any]:
    """A run as ``GET /v1/runs/{id}`` and ``fleet runs show --json`` give it."""
    return {**run.model_dump(), "latency_s": run.latency_s, "tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
            "cost": run.cost, "trace_id": run.trace_id, "timeline": timeline(run).model_dump()}


class AgentStepInfo(BaseModel):
    name: str
    kind: str
    loop: str | None = Field(None, description="The loop step this step repeats in, if any.")


class AgentInfo(BaseModel):
    name: str
    description: str
    steps: list[AgentStepInfo]
    input_schema: dict[str, Any]
    example: dict[str, Any]


class AgentList(BaseModel):
    agents: list[AgentInfo]


def agent_infos(agents: dict[str, AgentDef]) -> list[AgentInfo]:
    """Agents as ``GET /v1/agents`` and ``fleet agents --json`` list them, by name."""
    return [
        AgentInfo(
            name=name,
            description=agent.description,
            steps=[AgentStepInfo(name=s.name, kind=s.kind, loop=loop.name if loop else None)
                   for s, loop in agent.iter_steps()],
            input_schema=agent.json_schema(),
            example=agent.example,
        )
        for name, agent in sorted(agents.items())
    ]
