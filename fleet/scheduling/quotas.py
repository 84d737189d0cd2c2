"""Tenants' quotas, checked at the door: runs queued and in flight per class, submissions per
second, model tokens per UTC day.

A submission (or a batch of them) takes what it needs in one Lua call, which either refuses
with the quota that is short and when to retry, or counts the runs as active. A run gives
its place back in the step that ends it (:mod:`fleet.run.records`' terminal transition), so the
counts are those of runs not yet ended, the backlog's included. Model tokens are added in
the round trip that commits each step (:mod:`fleet.run.usage`), so a tenant over its daily
tokens is refused new runs; runs already admitted finish.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis

from fleet.core import lua
from fleet.errors import InvalidSubmission, QuotaExceeded
from fleet.keys import active_field
from fleet.run.usage import seconds_to_day_end, utc_day
from fleet.tenants import Quotas

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)

_TAKE = lua.load(__file__, "take_places-3.lua")


class QuotaGate:
    """Takes and gives back tenants' places; reads their use."""

    def __init__(self, settings: "Settings", client: "redis.Redis") -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client

    def take(self, tenant: str, priority: "PriorityClass", n: int = 1, now: float | None = None) -> None:
        """Count ``n`` new runs of a class as the tenant's, or raise :class:`QuotaExceeded`
        (nothing counted) naming the quota and when to retry.

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
        res = _TAKE(
            self.redis, keys=[self.keys.tenant_active, self.keys.tenant_bucket(tenant), self.keys.tenant_tokens(utc_day(now))],
            args=[active_field(tenant, priority), n, -1 if limit is None else limit,
                  -1 if quotas.submissions_per_s is None else quotas.submissions_per_s, quotas.burst(), repr(now),
                  -1 if quotas.tokens_per_day is None else quotas.tokens_per_day, tenant,
                  repr(seconds_to_day_end(now))])
        if res[0] == 1:
            return
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

    def give_back(self, tenant: str, priority: "PriorityClass", n: int = 1) -> None:
        """Uncount runs that were taken but never queued."""
        try:
            self.redis.hincrby(self.keys.tenant_active, active_field(tenant, priority), -n)
        except redis.RedisError as exc:
            # Called while another failure is raised: that one is the caller's to see; the
            # count stays n too high, the tenant's quota that much tighter.
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
