"""Counters that drift are recounted from the run records.

Two things are counted beside the runs rather than read from them, because admission checks
them on every submission: each tenant's places per class (:mod:`fleet.scheduling.quotas`) and
the ledger of admitted interactive runs (:mod:`fleet.scheduling.admitted`). They change in the
same Lua step as the runs wherever one step can hold both; where it cannot, a fault in between
leaves them wrong: a give-back that failed left a tenant a place tighter for good, and a
failover that lost the primary's last writes can take a count's change and leave its run's (or
the reverse).

:class:`Recount` puts them right: one Lua call (``recount-7.lua``) counts what they should be and
corrects them in the same step, so no admission or run's end can come between the count and the
correction. A tenant's places of a class are its runs not ended (the active index, and the runs parked at a
wait step), its runs
waiting in the backlog (a per-tenant count changed in the same step as their compact records),
and the places of admissions on their way (:class:`~fleet.scheduling.quotas.Claim`\\ s not yet
settled): those are a run's that has not been recorded yet, not a leak, unless their admission
is older than :data:`CLAIM_GRACE_S` (it died, or its give-back failed). The reconciler runs it
every pass (:mod:`fleet.scheduling.reconcile`).

The count reads every unfinished run's hash in one step: at thousands of runs in flight, a few
milliseconds of Redis, once per reconciler pass. Backlog runs are counted by tenant, not read.
A compact record that expires (``FLEET_RUN_TTL_S``) without being dispatched is not seen leaving
the backlog's count.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from fleet.core import lua
from fleet.run.agent import AgentDef
from fleet.run.records import TERMINAL
from fleet.scheduling.admitted import llm_steps
from fleet.settings import Settings

log = logging.getLogger(__name__)

#: An admission's places not turned into runs after this long are a leak (its process died, or
#: its give-back failed); younger ones belong to a run on its way.
CLAIM_GRACE_S = 300.0

_TERMINAL_TABLE = "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL)) + "}\n"
_RECOUNT = lua.load(__file__, "recount-7.lua", prelude=_TERMINAL_TABLE)


@dataclass
class Recounted:
    """What a recount corrected: per ``<tenant>|<class>``, the count it found and the one it set;
    the ledger's entries it dropped and added."""

    places: dict[str, tuple[int, int]] = field(default_factory=dict)
    ledger_dropped: int = 0
    ledger_added: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.places or self.ledger_dropped or self.ledger_added)


class Recount:
    """Recounts one fleet namespace's tenants' places and admitted-run ledger."""

    def __init__(self, settings: Settings, client: redis.Redis, agents: dict[str, AgentDef],
                 claim_grace_s: float = CLAIM_GRACE_S) -> None:
        self.settings, self.redis, self.claim_grace_s = settings, client, claim_grace_s
        self.steps = [x for name, agent in sorted(agents.items()) for x in (name, llm_steps(agent))]

    def run(self, now: float | None = None) -> Recounted:
        """One recount; what it corrected (logged when anything)."""
        k = self.settings.keys
        flat = _RECOUNT(self.redis, keys=[k.tenant_active, k.active_runs, k.backlog_runs, k.quota_claims,
                                          k.admitted("interactive"), k.admitted_steps("interactive"), k.waits],
                        args=[k.run(""), repr(time.time() if now is None else now), self.claim_grace_s, *self.steps])
        out = Recounted(ledger_dropped=int(flat[-2]), ledger_added=int(flat[-1]))
        for i in range(0, len(flat) - 3, 3):
            out.places[flat[i]] = (int(flat[i + 1]), int(flat[i + 2]))
        if out.changed:
            log.warning("recounted from the run records: tenants' places %s; admitted ledger: %d dropped, %d added",
                        ", ".join(f"{f} {a} -> {b}" for f, (a, b) in sorted(out.places.items())) or "unchanged",
                        out.ledger_dropped, out.ledger_added)
        return out
