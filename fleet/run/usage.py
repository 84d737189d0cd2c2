"""What runs used, per minute, by agent and class: tokens, time and estimated cost.

Figures are kept by tenant, agent and class. Workers add each step's figures (:func:`step_figures`) to a per-minute hash in Redis
(:meth:`fleet.keys.Keys.usage`) in the round trip that commits the step, and only when that
commit is the step's own: a duplicate delivery whose commit was refused adds nothing. A step
record that failed after its model call (a call cut short by its run's budget) is added
when its run ends, with the run itself. So the figures of a window are the sums over the
step records committed (or failed) in it, and ``fleet usage`` reads them back.

Figures: ``runs`` (ended), ``steps``, ``tokens_in``, ``tokens_out``, ``model_s`` (time at
the model), ``queue_s`` (time waiting in a queue), ``tool_s`` (time in tools) and ``cost``
(estimated, :mod:`fleet.run.cost`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from fleet.connections import redis_client
from fleet.core import lua
from fleet.run.codec import step_field
from fleet.tenants import DEFAULT_TENANT

if TYPE_CHECKING:  # pragma: no cover
    import redis

    from fleet.run.records import RunRecord, StepRecord
    from fleet.settings import Settings

FIGURES = ("runs", "steps", "tokens_in", "tokens_out", "model_s", "queue_s", "tool_s", "cost")
UsageKey = Literal["agent", "class", "tenant"]
_BUCKET_S = 60
_READ_CHUNK = 500

_ADD_USAGE = lua.load(__file__, "add_usage-3.lua")
#: Seconds in a day (the tokens quota's period).
DAY_S = 86400


def utc_day(at: float) -> str:
    """The UTC day of an epoch time, ``YYYYMMDD`` (the tokens quota's period)."""
    return dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%Y%m%d")


def seconds_to_day_end(at: float) -> float:
    """Seconds from ``at`` to the end of its UTC day."""
    return DAY_S - at % DAY_S


def step_figures(record: "StepRecord", kind: str) -> dict[str, float]:
    """What one step record adds to usage (``kind``: the step's, llm or tool)."""
    return {
        "steps": 1, "tokens_in": record.tokens_in, "tokens_out": record.tokens_out,
        "model_s": record.model_s or 0.0, "queue_s": record.queue_wait_s or 0.0,
        "tool_s": (record.duration_s or 0.0) if kind == "tool" else 0.0, "cost": record.cost,
    }


def run_end_figures(run: "RunRecord") -> dict[str, float]:
    """What a run adds to usage when it ends: itself, and its step records that failed after a
    model call (never committed, yet paid for)."""
    figures: dict[str, float] = {"runs": 1}
    for record in run.steps:
        if record.status == "failed" and record.model_s is not None:
            for name, value in step_figures(record, "llm").items():
                figures[name] = figures.get(name, 0) + value
    return figures


class UsageRow(BaseModel):
    """Usage of one agent (or class) over a window."""

    key: str = Field(description="The agent, class or tenant the figures are of.")
    runs: int = Field(0, description="Runs that ended.")
    steps: int = Field(0, description="Steps committed (or failed after their model call).")
    tokens_in: int = 0
    tokens_out: int = 0
    model_s: float = Field(0.0, description="Seconds at the model (model calls' durations).")
    queue_s: float = Field(0.0, description="Seconds steps waited in queues.")
    tool_s: float = Field(0.0, description="Seconds in tool steps.")
    cost: float = Field(0.0, description="Estimated cost (FLEET_PRICE_*).")

    def add(self, figure: str, value: float) -> None:
        setattr(self, figure, getattr(self, figure) + (round(value) if figure in _COUNTS else value))


_COUNTS = frozenset({"runs", "steps", "tokens_in", "tokens_out"})


class UsageReport(BaseModel):
    """``fleet usage``: rows by agent, class or tenant, largest cost first, and their total."""

    by: UsageKey
    since_s: float
    start: float = Field(description="Start of the first minute read (epoch seconds).")
    end: float = Field(description="When the report was made (epoch seconds).")
    rows: list[UsageRow]
    total: UsageRow


class UsageLedger:
    """The per-minute usage totals of one fleet namespace."""

    def __init__(self, settings: "Settings", client: "redis.Redis | None" = None) -> None:
        self.keys = settings.keys
        self.ttl_s = settings.usage_retention_s
        self.redis = client or redis_client(settings)

    def _bucket(self, at: float) -> str:
        return self.keys.usage(int(at // _BUCKET_S))

    @staticmethod
    def _fields(tenant: str, agent: str, priority: str, figures: dict[str, float]) -> list[str]:
        out: list[str] = []
        for figure, value in figures.items():
            if value:
                out += [f"{tenant}|{agent}|{priority}|{figure}", repr(float(value))]
        return out

    def step_command(self, run_id: str, record: "StepRecord", tenant: str, agent: str, priority: str, kind: str,
                     now: float | None = None) -> Callable[[Any], Any]:
        """A command, for the step's commit round trip, that adds its figures once."""
        now = time.time() if now is None else now
        fields = self._fields(tenant, agent, priority, step_figures(record, kind))
        keys = [self.keys.run(run_id), self._bucket(now), self.keys.tenant_tokens(utc_day(now))]
        args = [step_field(record.key), record.worker or "", record.attempts, repr(record.started_at or 0.0),
                self.ttl_s, tenant, record.tokens_in + record.tokens_out, *fields]
        return lambda pipe: _ADD_USAGE(pipe, keys, args)

    def add(self, tenant: str, agent: str, priority: str, figures: dict[str, float], now: float | None = None) -> None:
        """Add figures now (a run that ended, with its failed step records)."""
        fields = self._fields(tenant, agent, priority, figures)
        if not fields:
            return
        key = self._bucket(time.time() if now is None else now)
        pipe = self.redis.pipeline(transaction=False)
        for name, value in zip(fields[::2], fields[1::2]):
            pipe.hincrbyfloat(key, name, float(value))
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def _minutes(self, since_s: float, now: float) -> Iterable[dict[str, str]]:
        first, last = int((now - since_s) // _BUCKET_S), int(now // _BUCKET_S)
        minutes = list(range(first, last + 1))
        for i in range(0, len(minutes), _READ_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for minute in minutes[i:i + _READ_CHUNK]:
                pipe.hgetall(self.keys.usage(minute))
            yield from pipe.execute()

    def report(self, by: UsageKey = "agent", since_s: float = 86400.0, now: float | None = None,
               tenant: str | None = None) -> UsageReport:
        """Usage of the minutes that overlap the last ``since_s`` seconds, by agent, class or
        tenant (only ``tenant``'s when given)."""
        now = time.time() if now is None else now
        only = tenant
        rows: dict[str, UsageRow] = {}
        total = UsageRow(key="total")
        for bucket in self._minutes(since_s, now):
            for name, value in bucket.items():
                parts = name.split("|")
                tenant, agent, priority, figure = parts if len(parts) == 4 else [DEFAULT_TENANT, *parts]
                if only is not None and tenant != only:
                    continue
                key = agent if by == "agent" else priority if by == "class" else tenant
                row = rows.setdefault(key, UsageRow(key=key))
                row.add(figure, float(value))
                total.add(figure, float(value))
        ordered = sorted(rows.values(), key=lambda r: (-r.cost, -r.tokens_in - r.tokens_out, r.key))
        start = int((now - since_s) // _BUCKET_S) * _BUCKET_S
        return UsageReport(by=by, since_s=since_s, start=start, end=now, rows=ordered, total=total)


def model_time(ledger: UsageLedger, since_s: float, now: float | None = None) -> dict[tuple[str, str], float]:
    """(tenant, class) -> seconds at the model in the minutes overlapping the last ``since_s``."""
    now = time.time() if now is None else now
    out: dict[tuple[str, str], float] = {}
    for bucket in ledger._minutes(since_s, now):
        for name, value in bucket.items():
            parts = name.split("|")
            if parts[-1] != "model_s":
                continue
            tenant, priority = (parts[0], parts[2]) if len(parts) == 4 else (DEFAULT_TENANT, parts[1])
            out[(tenant, priority)] = out.get((tenant, priority), 0.0) + float(value)
    return out
