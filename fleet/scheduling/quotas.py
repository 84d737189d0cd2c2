"""Tenants' quotas, checked at the door: runs queued and in flight per class, submissions per
second, model tokens per UTC day.

A submission (or a batch of them) takes what it needs in one Lua call, which either refuses
with the quota that is short and when to retry, or counts the runs as active. The places taken
are also noted as the submission's :class:`Claim`, settled in the same step that records its
runs (or given back with the places): the counts then always equal the runs not yet ended plus
the claims not yet settled, and a recount (:mod:`fleet.scheduling.recount`) can tell a place
taken for a run on its way from a place that leaked. A run gives
its place back in the step that ends it (:mod:`fleet.run.records`' terminal transition), so the
counts are those of runs not yet ended, the backlog's included. Model tokens are added in
the round trip that commits each step (:mod:`fleet.run.usage`), so a tenant over its daily
tokens is refused new runs; runs already admitted finish.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from fleet.core import lua
from fleet.errors import InvalidSubmission, QuotaExceeded
from fleet.keys import active_field
from fleet.run.usage import seconds_to_day_end, utc_day
from fleet.tenants import Quotas

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)

_TAKE = lua.load(__file__, "take_places-4.lua")


@dataclass(frozen=True)
class Claim:
    """The places one admission took: its field in :attr:`fleet.keys.Keys.quota_claims`."""

    field: str

    @classmethod
    def new(cls, tenant: str, priority: str, token: str, now: float) -> "Claim":
        return cls(f"{active_field(tenant, priority)}|{token}|{now!r}")


class QuotaGate:
    """Takes and gives back tenants' places; reads their use."""

    def __init__(self, settings: "Settings", client: "redis.Redis") -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client

    def take(self, tenant: str, priority: "PriorityClass", n: int = 1, now: float | None = None,
             token: str = "") -> Claim:
        """Count ``n`` new runs of a class as the tenant's, or raise :class:`QuotaExceeded`
        (nothing counted) naming the quota and when to retry. Returns the claim to settle as the
        runs are recorded (:meth:`settle`); ``token`` names it (the run id of a single run).

        Raises:
            InvalidSubmission: ``n`` is more than the tenant's burst: it can never be taken at once.
        """
        now = time.time() if now is None else now
        quotas: Quotas = self.settings.tenant_registry.get(tenant).quotas
        if quotas.submissions_per_s is not None and n > quotas.burst():
            raise InvalidSubmission(
                f"{n} runs at once is over tenant '{tenant}''s burst of {quotas.burst()} submissions: "
                f"submit at most {quotas.burst()} at a time", "runs")
        limit = quotas.active_limit(priority)
        claim = Claim.new(tenant, priority, token or uuid.uuid4().hex, now)
        res = _TAKE(
            self.redis, keys=[self.keys.tenant_active, self.keys.tenant_bucket(tenant), self.keys.tenant_tokens(utc_day(now)),
                              self.keys.quota_claims],
            args=[active_field(tenant, priority), n, -1 if limit is None else limit,
                  -1 if quotas.submissions_per_s is None else quotas.submissions_per_s, quotas.burst(), repr(now),
                  -1 if quotas.tokens_per_day is None else quotas.tokens_per_day, tenant,
                  repr(seconds_to_day_end(now)), claim.field])
        if res[0] == 1:
            return claim
        quota, retry, detail = res[1], float(res[2]), res[3]
        if quota == "active":
            name = f"max_active_{priority}"
            # A place frees when one of the tenant's runs of this class ends.
            retry = self._step_s(priority)
            raise QuotaExceeded(
                f"tenant '{tenant}' has {detail} {priority} runs queued or in flight, its quota {name} is "
                f"{limit}: nothing was queued; retry once some end (in about {retry:.0f}s)", retry, name)
        if quota == "submissions_per_s":
            raise QuotaExceeded(
                f"tenant '{tenant}' submits over its quota submissions_per_s of {quotas.submissions_per_s:g} "
                f"(burst {quotas.burst()}): nothing was queued; retry in {retry:.1f}s", retry, quota)
        raise QuotaExceeded(
            f"tenant '{tenant}' used {int(float(detail))} model tokens today (UTC), its quota tokens_per_day "
            f"is {quotas.tokens_per_day}: nothing was queued; retry after midnight UTC, in {retry:.0f}s",
            retry, quota)

    def settle(self, claim: Claim, n: int) -> Callable[[Any], Any]:
        """A command, for the pipeline (a transaction) that records ``n`` of the claim's runs,
        that settles that many of its places: they are the runs' now."""
        return lambda pipe: pipe.hincrby(self.keys.quota_claims, claim.field, -n)

    def give_back(self, tenant: str, priority: "PriorityClass", n: int = 1, claim: Claim | None = None) -> None:
        """Uncount runs that were taken but never queued (and settle them from ``claim``)."""
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(self.keys.tenant_active, active_field(tenant, priority), -n)
            if claim is not None:
                pipe.hincrby(self.keys.quota_claims, claim.field, -n)
            pipe.execute()
        except redis.RedisError as exc:
            # Called while another failure is raised: that one is the caller's to see; the
            # count stays n too high, the tenant's quota that much tighter, until the next
            # recount finds the claim unsettled past its grace and drops it.
            log.warning("tenant %s: could not give back %d %s places: %s", tenant, n, priority, exc)

    def _step_s(self, priority: str) -> float:
        times = self.redis.lrange(self.keys.step_times("llm", priority), 0, -1)
        return max(1.0, sorted(float(t) for t in times)[len(times) // 2]) if times else 1.0

    def active(self) -> dict[tuple[str, str], int]:
        """(tenant, class) -> runs queued or in flight."""
        out = {}
        for field, value in self.redis.hgetall(self.keys.tenant_active).items():
            tenant, _, priority = field.rpartition("|")
            out[(tenant, priority)] = max(0, int(value))
        return out

    def tokens_today(self, now: float | None = None) -> dict[str, int]:
        """tenant -> model tokens used today (UTC)."""
        raw = self.redis.hgetall(self.keys.tenant_tokens(utc_day(time.time() if now is None else now)))
        return {t: int(float(v)) for t, v in raw.items()}
