"""The runs index: which runs there are, by tenant, class, agent, status and time, so that an
operator finds runs without knowing their ids (``fleet runs list``, ``GET /v1/runs``, the
console), and a short id names its run.

It is written by the same atomic steps that create and end a run (:mod:`fleet.run.store`: the
transaction that creates one, and the promote, transition and reopen scripts, which include
``fleet/core/lua_fragments/run_index.lua``)::

    runs:idx:by:<tenant>|<class>|<agent>  sorted set by creation time   every indexed run
    runs:idx:status:<tenant>|<status>     sorted set by creation time   every status but succeeded
    runs:idx:ids                          sorted set, score 0 (lexical)  every indexed run
    runs:idx:facets                       set: the <tenant>|<class>|<agent> there are

``succeeded``, the common ending, has no set of its own: a listing of succeeded runs walks the
sets by tenant, class and agent and reads each row's status. So a succeeded run costs two
entries, any other three (see README for the bytes). A batch run is indexed when the
dispatcher takes it out of the backlog (or when it ends there), not while it waits: a
queued backlog run keeps its compact record's cost, and listings say how many wait there.

A listing (:meth:`RunIndex.page`) walks, newest first from its cursor, the family of sets its
filters select that holds fewer runs in the time range (the status sets, when a status filter
leaves out succeeded; else the sets by tenant, class and agent), merged by one script; each row
read is checked against the other filters. One listing examines at most :data:`SCAN_MAX` runs
and hands back a cursor to go on from: no listing reads the whole index.

Entries go when their run's record goes: a record lives at least ``min(FLEET_RESULT_TTL_S,
FLEET_RUN_TTL_S)`` from its creation, so :meth:`RunIndex.trim` (in the reconciler's loop) walks
only the entries older than that, a bounded number a pass, and drops those whose record is gone
(a script that checks again, so a run restored by a replay meanwhile stays).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.core import lua
from fleet.errors import InvalidSubmission
from fleet.run.codec import summary_commands, summary_reply
from fleet.run.records import TERMINAL, RunRecord, RunStatus, RunSummary
from fleet.settings import PriorityClass, Settings
from fleet.tenants import TENANT_PATTERN

#: Statuses with a set of their own (all but succeeded), in the order scripts are given them.
INDEXED_STATUSES: tuple[str, ...] = ("queued", "running", "waiting", "failed", "dead_lettered", "cancelled", "expired",
                                     "budget_exceeded")
#: Endings that carry an error (a filter on the error's text looks only at these).
ERROR_STATUSES = frozenset(TERMINAL - {"succeeded"})
#: Most runs one listing examines before it hands back a cursor.
SCAN_MAX = 10_000
#: Fewest hex digits of a short run id.
MIN_PREFIX = 6
#: A run id, or a prefix of one (a short id).
RUN_REF_PATTERN = rf"^[0-9a-f]{{{MIN_PREFIX},32}}$"
#: A listing's cursor: the creation time and id of the last run it showed (or examined).
CURSOR_PATTERN = r"^[0-9]{1,11}(\.[0-9]{1,9})?:[0-9a-f]{32}$"

_FULL_ID = re.compile(r"^[0-9a-f]{32}$")
_PAGE = lua.load(__file__, "page.lua")
_UNINDEX = lua.load(__file__, "unindex-11.lua")


class RunQuery(BaseModel):
    """What a listing asks for: filters (all optional, each narrowing the others), a page size
    and where to go on from."""

    model_config = ConfigDict(extra="forbid")

    status: list[RunStatus] | None = Field(None, description="Runs in any of these statuses.")
    agent: str | None = Field(None, min_length=1, max_length=128, description="Runs of this agent.")
    priority: PriorityClass | None = Field(None, description="Runs of this class.")
    tenant: str | None = Field(None, pattern=TENANT_PATTERN,
                               description="Runs of this tenant (a tenant's caller sees its own runs only).")
    since: float | None = Field(None, ge=0, le=1e11, description="Runs created at or after this Unix time (s).")
    until: float | None = Field(None, ge=0, le=1e11, description="Runs created at or before this Unix time (s).")
    error: str | None = Field(None, min_length=1, max_length=200,
                              description="Runs whose error (type or message) contains this text, any case.")
    limit: int = Field(50, ge=1, le=500, description="Most runs in the page.")
    cursor: str | None = Field(None, pattern=CURSOR_PATTERN, description="Go on after this page's next_cursor.")


def is_run_id(ref: str) -> bool:
    """Whether ``ref`` is a whole run id (rather than a short one)."""
    return bool(_FULL_ID.match(ref))


def run_query(**filters: Any) -> RunQuery:
    """A :class:`RunQuery` from a client's arguments (None: not given); :class:`InvalidSubmission`
    names the field that is wrong."""
    try:
        return RunQuery.model_validate({k: v for k, v in filters.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "query"
        raise InvalidSubmission(f"{field}: {err['msg']}", field) from None


class RunPage(BaseModel):
    """One page of a listing, newest first."""

    runs: list[RunSummary]
    next_cursor: str | None = Field(description="Where the next page starts; null when there is no more.")
    scanned: int = Field(description="Index entries this page examined.")


def _cursor(score: str, run_id: str) -> str:
    return f"{score}:{run_id}"


def _parse_cursor(cursor: str) -> tuple[str, str]:
    score, _, run_id = cursor.partition(":")
    try:
        value = float(score)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidSubmission(f"cursor: '{cursor}' is not a cursor of a listing", "cursor")
    return score, run_id


def _error_match(run: RunSummary, text: str) -> bool:
    return text.lower() in run.error_text.lower()


class RunIndex:
    """The runs index of one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client

    # --- writes beside the run's own (its scripts write the rest) ----------------------
    def add_commands(self, pipe: Any, record: RunRecord) -> None:
        """Queue a new run's entries on ``pipe`` (the transaction that creates it)."""
        k, score = self.keys, record.created_at
        pipe.zadd(k.runs_by(record.tenant, record.priority, record.agent), {record.id: score})
        pipe.sadd(k.runs_facets, f"{record.tenant}|{record.priority}|{record.agent}")
        pipe.zadd(k.runs_ids, {record.id: 0})
        if record.status != "succeeded":
            pipe.zadd(k.runs_by_status(record.tenant, record.status), {record.id: score})

    def remove_commands(self, pipe: Any, run_id: str, tenant: str, priority: str, agent: str) -> None:
        """Queue the removal of a run's entries on ``pipe`` (a run forgotten with its record)."""
        pipe.zrem(self.keys.runs_by(tenant, priority, agent), run_id)
        pipe.zrem(self.keys.runs_ids, run_id)
        for status in INDEXED_STATUSES:
            pipe.zrem(self.keys.runs_by_status(tenant, status), run_id)

    # --- short ids --------------------------------------------------------------------
    def matches(self, prefix: str, limit: int = 100) -> list[str]:
        """Ids of indexed runs that start with ``prefix`` (at most ``limit``), in order."""
        return self.redis.zrangebylex(self.keys.runs_ids, f"[{prefix}", f"({prefix}\xff", start=0, num=limit)

    def short_ids(self, run_ids: list[str], length: int = 8) -> dict[str, str]:
        """Each run's id cut to ``length`` hex digits, or more where that starts another indexed
        run's id too (as git shortens commit ids): what is printed names the run when given back."""
        out = {run_id: run_id[:length] for run_id in run_ids}
        pending = list(run_ids)
        while pending:
            pipe = self.redis.pipeline(transaction=False)
            for run_id in pending:
                pipe.zlexcount(self.keys.runs_ids, f"[{out[run_id]}", f"({out[run_id]}\xff")
            pending = [run_id for run_id, n in zip(pending, pipe.execute()) if n > 1 and len(out[run_id]) < 32]
            for run_id in pending:
                out[run_id] = run_id[:len(out[run_id]) + 2]
        return out

    def size(self) -> int:
        """Runs in the index."""
        return int(self.redis.zcard(self.keys.runs_ids))

    # --- listings ---------------------------------------------------------------------
    def facets(self) -> list[tuple[str, str, str]]:
        """``(tenant, class, agent)`` of every set of runs there is."""
        return sorted(tuple(f.split("|", 2)) for f in self.redis.smembers(self.keys.runs_facets))  # type: ignore[misc]

    def page(self, q: RunQuery, tenant: str | None = None) -> RunPage:
        """One page of runs matching ``q``, newest first; ``tenant``: the only tenant the caller
        sees (None: an operator, who sees every tenant)."""
        statuses = set(q.status) if q.status else None
        if q.error is not None:
            statuses = (statuses if statuses is not None else set(TERMINAL)) & ERROR_STATUSES
        drivers = self._drivers(q, tenant, statuses)
        top, after = _parse_cursor(q.cursor) if q.cursor else (repr(q.until) if q.until is not None else "+inf", "")
        oldest = repr(q.since) if q.since is not None else "-inf"
        filtered = statuses is not None or q.priority is not None or q.agent is not None
        # Without filters on rows every run found is shown: find one more than the page (to know
        # whether another follows); with them, more at a time.
        n = min(500, max(2 * q.limit, 100)) if filtered else q.limit + 1
        runs: list[RunSummary] = []
        scanned = 0
        while drivers:
            flat = _PAGE(self.redis, keys=drivers, args=[top, after, oldest, n])
            ended, pairs = bool(flat[-1]), [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
            for i, (run_id, score, run) in enumerate(self._rows(pairs, q.limit - len(runs), filtered)):
                scanned += 1
                top, after = score, run_id
                if run is not None and self._keep(run, q, tenant, statuses):
                    runs.append(run)
                    if len(runs) == q.limit:
                        last = ended and i == len(pairs) - 1
                        return RunPage(runs=runs, next_cursor=None if last else _cursor(score, run_id),
                                       scanned=scanned)
            if ended:
                break
            if scanned >= SCAN_MAX:
                return RunPage(runs=runs, next_cursor=_cursor(top, after), scanned=scanned)
        return RunPage(runs=runs, next_cursor=None, scanned=scanned)

    def _rows(self, pairs: list[tuple[str, str]], wanted: int, filtered: bool) -> Iterator[
            tuple[str, str, RunSummary | None]]:
        """``(id, score, row)`` of found runs (row None: its record is gone), read in chunks of
        what the page still needs (more at a time when rows are filtered)."""
        size = max(wanted, 50) if filtered else wanted
        for start in range(0, len(pairs), max(1, size)):
            chunk = pairs[start:start + max(1, size)]
            pipe = self.redis.pipeline(transaction=False)
            for run_id, _ in chunk:
                summary_commands(pipe, self.keys, run_id)
            for (run_id, score), values in zip(chunk, pipe.execute()):
                raw = summary_reply(run_id, values)
                yield run_id, score, RunSummary.model_validate(raw) if raw is not None else None

    def _drivers(self, q: RunQuery, tenant: str | None, statuses: set[str] | None) -> list[str]:
        """The sets a listing walks: those of the selected family that hold fewer runs in the range."""
        if statuses is not None and not statuses:
            return []
        wanted = {tenant} if tenant is not None else None
        if q.tenant is not None:
            wanted = {q.tenant} if wanted is None or q.tenant in wanted else set()
        facets = [f for f in self.facets() if (wanted is None or f[0] in wanted)
                  and (q.priority is None or f[1] == q.priority) and (q.agent is None or f[2] == q.agent)]
        by = [self.keys.runs_by(*f) for f in facets]
        if statuses is None or "succeeded" in statuses or not by:
            return by
        tenants = sorted({f[0] for f in facets})
        by_status = [self.keys.runs_by_status(t, s) for t in tenants for s in sorted(statuses)]
        low = repr(q.since) if q.since is not None else "-inf"
        high = repr(q.until) if q.until is not None else "+inf"
        pipe = self.redis.pipeline(transaction=False)
        for key in (*by, *by_status):
            pipe.zcount(key, low, high)
        counts = pipe.execute()
        return by_status if sum(counts[len(by):]) <= sum(counts[:len(by)]) else by

    @staticmethod
    def _keep(run: RunSummary, q: RunQuery, tenant: str | None, statuses: set[str] | None) -> bool:
        return ((tenant is None or run.tenant == tenant) and (q.tenant is None or run.tenant == q.tenant)
                and (statuses is None or run.status in statuses)
                and (q.priority is None or run.priority == q.priority) and (q.agent is None or run.agent == q.agent)
                and (q.error is None or _error_match(run, q.error)))

    # --- ageing out ---------------------------------------------------------------------
    def trim(self, now: float | None = None, budget: int = 2000) -> int:
        """Drop entries whose record is gone: per set, up to ``budget`` of the entries old enough
        for their record to have expired, going on where the last pass stopped. Returns how many
        runs were dropped."""
        now = time.time() if now is None else now
        cutoff = now - min(self.settings.result_ttl_s, self.settings.run_ttl_s)
        dropped = 0
        for facet in self.facets():
            dropped += self._trim_set(facet, cutoff, budget)
        return dropped

    def _trim_set(self, facet: tuple[str, str, str], cutoff: float, budget: int) -> int:
        k, name = self.keys, "|".join(facet)
        key = k.runs_by(*facet)
        rank = int(self.redis.hget(k.runs_trim, name) or 0)
        entries = self.redis.zrange(key, rank, rank + budget - 1, withscores=True)
        old = [run_id for run_id, score in entries if score <= cutoff]
        gone: list[str] = []
        if old:
            pipe = self.redis.pipeline(transaction=False)
            for run_id in old:
                pipe.exists(k.run(run_id))
            gone = [run_id for run_id, there in zip(old, pipe.execute()) if not there]
        dropped = 0
        if gone:
            status_keys = [k.runs_by_status(facet[0], s) for s in INDEXED_STATUSES]
            pipe = self.redis.pipeline(transaction=False)
            for run_id in gone:
                _UNINDEX(pipe, keys=[k.run(run_id), key, k.runs_ids, *status_keys], args=[run_id])
            dropped = sum(lua.execute(pipe))
        # The next pass goes on after what this one kept; from the start once the old ones are seen.
        reached_young = len(old) < len(entries) or len(entries) < budget
        self.redis.hset(k.runs_trim, name, 0 if reached_young else rank + len(old) - dropped)
        return dropped
