"""What a run and an agent look like from outside: the views the HTTP gateway answers and
the CLI prints with ``--json``, built in one place so the two never drift."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model

from fleet.run.agent import AgentDef, LoopStep, ParallelStep, WaitStep
from fleet.run.index import RunPage
from fleet.run.records import RunRecord, RunSummary
from fleet.surfaces.timeline import Timeline, timeline
from fleet.tenants import Quotas

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
    timeline=(Timeline, Field(description="Where the run's time went, step by step (fleet.surfaces.timeline).")),
)


def run_view(run: RunRecord) -> dict[str, Any]:
    """A run as ``GET /v1/runs/{id}`` and ``fleet runs show --json`` give it."""
    return {**run.model_dump(), "latency_s": run.latency_s, "tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
            "cost": run.cost, "trace_id": run.trace_id, "timeline": timeline(run).model_dump()}


class RunRow(BaseModel):
    """One run of a listing."""

    id: str
    agent: str
    priority: str
    tenant: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    latency_s: float | None = Field(description="Submission to finish, once finished.")
    error: dict[str, Any] | None
    batch: str | None
    trace_id: str | None


class RunList(BaseModel):
    """A page of runs, newest first (``GET /v1/runs``, ``fleet runs list --json``)."""

    runs: list[RunRow]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null when there is no more.")
    scanned: int = Field(description="Index entries this page examined (at most 10,000 a page).")
    backlog: int = Field(description="Batch runs of these tenants still waiting in the backlog: they are "
                                     "listed once dispatched.")


def run_row(run: RunSummary) -> RunRow:
    return RunRow(**run.model_dump(exclude={"traceparent"}), latency_s=run.latency_s, trace_id=run.trace_id)


def run_list(page: RunPage, backlog: int) -> RunList:
    """A listing as ``GET /v1/runs`` and ``fleet runs list --json`` give it."""
    return RunList(runs=[run_row(r) for r in page.runs], next_cursor=page.next_cursor, scanned=page.scanned,
                   backlog=backlog)


class AgentStepInfo(BaseModel):
    name: str
    kind: str
    loop: str | None = Field(None, description="The loop step this step repeats in, if any.")
    parallel: str | None = Field(None, description="The parallel step this step is a branch of, if any.")
    model: str | None = Field(None, description="The model or role an llm step names (None: the default).")
    fallback: str | None = Field(None, description="The model or role an llm step falls back to.")
    signal: str | None = Field(None, description="The signal a wait step waits for.")


def _step_infos(agent: AgentDef) -> list[AgentStepInfo]:
    """An agent's steps in order: executable steps (with their loop), parallel steps followed by
    their branch steps, wait steps."""
    out: list[AgentStepInfo] = []
    for top in agent.steps:
        if isinstance(top, LoopStep):
            out += [AgentStepInfo(name=s.name, kind=s.kind, loop=top.name, model=getattr(s, "model", None),
                                  fallback=getattr(s, "fallback", None)) for s in top.body]
        elif isinstance(top, ParallelStep):
            out.append(AgentStepInfo(name=top.name, kind=top.kind))
            out += [AgentStepInfo(name=s.name, kind=s.kind, parallel=top.name, model=getattr(s, "model", None),
                                  fallback=getattr(s, "fallback", None)) for s in top.branches or [top.branch]]
        elif isinstance(top, WaitStep):
            out.append(AgentStepInfo(name=top.name, kind=top.kind, signal=top.signal))
        else:
            out.append(AgentStepInfo(name=top.name, kind=top.kind, model=getattr(top, "model", None),
                                     fallback=getattr(top, "fallback", None)))
    return out


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
            steps=_step_infos(agent),
            input_schema=agent.json_schema(),
            example=agent.example,
        )
        for name, agent in sorted(agents.items())
    ]


class TenantRow(BaseModel):
    """One tenant as operators see it (``fleet tenants``, ``GET /v1/tenants``)."""

    name: str
    weight: float
    active: dict[str, int] = Field(description="Runs queued (backlog included) or in flight, by class.")
    backlog: int = Field(0, description="Batch runs waiting in the backlog to be dispatched.")
    model_s: dict[str, float] = Field(description="Seconds at the model in the window, by class.")
    batch_share: float | None = Field(
        None, description="Its part of all tenants' batch model time in the window (0-1); None without any.")
    tokens_today: int = Field(description="Model tokens its steps used today (UTC).")
    quotas: Quotas


class TenantReport(BaseModel):
    window_s: float = Field(description="How far back model time is read.")
    tenants: list[TenantRow]


def tenant_rows(tenants: dict[str, tuple[float, Quotas]], active: dict[tuple[str, str], int],
                backlog: dict[str, int], model_s: dict[tuple[str, str], float], tokens: dict[str, int],
                window_s: float, only: str | None = None) -> TenantReport:
    """The operator's view of tenants from what Redis holds; ``only``: that tenant's row alone.
    Tenants that are no longer configured but still have runs are shown with weight 1."""
    names = set(tenants) | {t for t, _ in active} | set(backlog) | {t for t, _ in model_s} | set(tokens)
    batch_total = sum(v for (_, c), v in model_s.items() if c == "batch")
    rows = []
    for name in sorted(names):
        if only is not None and name != only:
            continue
        weight, quotas = tenants.get(name, (1.0, Quotas()))
        batch_s = model_s.get((name, "batch"), 0.0)
        rows.append(TenantRow(
            name=name, weight=weight,
            active={c: active.get((name, c), 0) for c in ("interactive", "batch")},
            backlog=backlog.get(name, 0),
            model_s={c: round(model_s.get((name, c), 0.0), 3) for c in ("interactive", "batch")},
            batch_share=round(batch_s / batch_total, 4) if batch_total else None,
            tokens_today=tokens.get(name, 0), quotas=quotas))
    return TenantReport(window_s=window_s, tenants=rows)
