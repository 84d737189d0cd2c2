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

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from fleet.scheduling.quotas import utc_day
from fleet.run.records import step_field
from fleet.tenants import DEFAULT_TENANT

if TYPE_CHECKING:  # pragma: no cover
    import redis

    from fleet.run.records import StepRecord
    from fleet.settings import Settings

FIGURES = ("runs", "steps", "tokens_in", "tokens_out", "model_s", "queue_s", "tool_s", "cost")
UsageKey = Literal["agent", "class", "tenant"]
_BUCKET_S = 60
_READ_CHUNK = 500

# Add a committed step's figures to its minute, and its tokens to its tenant's day (the
# tokens quota, fleet.scheduling.quotas), if the commit that stored the step's record is this
# delivery's (same worker, attempt and start). KEYS: run hash, minute hash, the day's tokens.
# ARGV: the step record's field, worker, attempts, started_at, TTL, tenant, tokens,
# then field/increment pairs.
_ADD_IF_COMMITTED = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['worker'] ~= ARGV[2] or tonumber(rec['attempts']) ~= tonumber(ARGV[3])
   or tonumber(rec['started_at']) ~= tonumber(ARGV[4]) then return 0 end
for i = 8, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if tonumber(ARGV[7]) > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[6], ARGV[7])
  redis.call('EXPIRE', KEYS[3], 2 * 86400)
end
return 1
"""


def step_figures(record: "StepRecord", kind: str) -> dict[str, float]:
    """What one step record adds to usage (``kind``: the step's, llm or tool)."""
    return {
        "steps": 1, "tokens_in": record.tokens_in, "tokens_out": record.tokens_out,
        "model_s": record.model_s or 0.0, "queue_s": record.queue_wait_s or 0.0,
        "tool_s": (record.duration_s or 0.0) if kind == "tool" else 0.0, "cost": record.cost,
    }


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
        self.redis = client or settings.redis()

    def _bucket(self, at: float) -> str:
        return self.keys.usage(int(at // _BUCKET_S))

    @staticmethod
    def _fields(tenant: str, agent: str, priority: str, figures: dict[str, float]) -> list[str]:
        out: list[str] = []
        for figure, value in figures.items():
            if value:
                out += [f"{tenant}|{agent}|{priority}|{figure}", repr(float(value))]
        return out

    def step_commands(self, run_key: str, record: "StepRecord", tenant: str, agent: str, priority: str, kind: str,
                      now: float | None = None) -> list[tuple[str, tuple]]:
        """Redis commands, for the step's commit round trip, that add its figures once."""
        now = time.time() if now is None else now
        fields = self._fields(tenant, agent, priority, step_figures(record, kind))
        args = [step_field(record.key), record.worker or "", record.attempts, repr(record.started_at or 0.0),
                self.ttl_s, tenant, record.tokens_in + record.tokens_out, *fields]
        return [("eval", (_ADD_IF_COMMITTED, 3, run_key, self._bucket(now), self.keys.tenant_tokens(utc_day(now)),
                          *args))]

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
