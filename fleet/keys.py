"""Every Redis key and channel the fleet writes, side by side.

All of them live under ``FLEET_KEY_PREFIX`` (queues have their own prefix, see
:mod:`fleet.broker.queues`), so several fleets can share one Redis. What a key holds is written
next to it; only :mod:`fleet.run.records` knows the fields inside a run hash.
"""

from __future__ import annotations


def active_field(tenant: str, priority: str) -> str:
    """The field of a tenant's runs of a class in :attr:`Keys.tenant_active` (Lua scripts build
    it with ``fleet/core/lua_fragments/active_field.lua``)."""
    return f"{tenant}|{priority}"


class Keys:
    """The key names of one fleet namespace."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- runs -------------------------------------------------------------------------
    def run(self, run_id: str) -> str:
        """Hash: the run's fields, step outputs and step records (see fleet.run.records)."""
        return self._k("run", run_id)

    def events(self, run_id: str) -> str:
        """Stream: the run's events (status, step, token), capped."""
        return self._k("run", run_id, "events")

    def deliveries(self, run_id: str, step_key: str, retry: int) -> str:
        """Counter: deliveries of one step message that did not finish (poison guard)."""
        return self._k("run", run_id, "deliveries", f"{step_key}@{retry}")

    def deliveries_pattern(self, run_id: str) -> str:
        return self._k("run", run_id, "deliveries", "*")

    @property
    def active_runs(self) -> str:
        """Sorted set: unfinished runs scored by the time of their last progress (reconciler)."""
        return self._k("runs", "active")

    def idempotency(self, tenant: str, key: str) -> str:
        """String: ``<run id> <fingerprint>``, the run a tenant's idempotency key names and
        the fingerprint of the submission that made it."""
        return self._k("idem", tenant, key)

    def session(self, tenant: str, session_id: str) -> str:
        """List: the turns of a tenant's session, oldest first."""
        return self._k("session", tenant, session_id)

    # --- the runs index (fleet.run.index) ------------------------------------------------
    # Lua scripts build these names from :attr:`runs_index_base` with
    # ``fleet/core/lua_fragments/run_index.lua``, the same way as here.
    @property
    def runs_index_base(self) -> str:
        """The common start of the runs index's keys."""
        return self._k("runs", "idx", "")

    def runs_by(self, tenant: str, priority: str, agent: str) -> str:
        """Sorted set: a tenant's runs of a class and agent, scored by creation time."""
        return f"{self.runs_index_base}by:{tenant}|{priority}|{agent}"

    def runs_by_status(self, tenant: str, status: str) -> str:
        """Sorted set: a tenant's runs in a status (every status but ``succeeded``), scored by
        creation time."""
        return f"{self.runs_index_base}status:{tenant}|{status}"

    @property
    def runs_ids(self) -> str:
        """Sorted set, every score 0: the ids of indexed runs, in lexical order (short ids)."""
        return f"{self.runs_index_base}ids"

    @property
    def runs_facets(self) -> str:
        """Set: ``<tenant>|<class>|<agent>`` of every :meth:`runs_by` set there is."""
        return f"{self.runs_index_base}facets"

    @property
    def runs_trim(self) -> str:
        """Hash: facet -> rank where the walk that drops expired runs from its set goes on."""
        return f"{self.runs_index_base}trim"

    def usage(self, minute: int) -> str:
        """Hash with TTL: what runs used in one minute (epoch minute), fields
        ``<agent>|<class>|<figure>`` (see fleet.run.usage)."""
        return self._k("usage", str(minute))

    # --- tenants ----------------------------------------------------------------------
    @property
    def tenant_active(self) -> str:
        """Hash: ``<tenant>|<class>`` -> runs queued (backlog included) or in flight (fleet.scheduling.quotas)."""
        return self._k("tenants", "active")

    @property
    def quota_claims(self) -> str:
        """Hash: ``<tenant>|<class>|<token>|<taken at>`` -> places an admission took and has not yet
        turned into runs (or given back): what a recount of the tenants' places counts beside the
        runs (fleet.scheduling.quotas, fleet.scheduling.recount)."""
        return self._k("tenants", "claims")

    def tenant_bucket(self, tenant: str) -> str:
        """Hash with TTL: a tenant's submission token bucket, ``level`` and ``at`` (fleet.scheduling.quotas)."""
        return self._k("tenants", "bucket", tenant)

    def tenant_tokens(self, day: str) -> str:
        """Hash with TTL: tenant -> model tokens its steps used on a UTC day ``YYYYMMDD``."""
        return self._k("tenants", "tokens", day)
    # --- the batch backlog and its fair share -------------------------------------------
    def queued_run(self, run_id: str) -> str:
        """String with TTL: the compact record of a batch run still in the backlog (fleet.run.records);
        it becomes the run hash when the run is dispatched."""
        return self._k("queued", run_id)

    def backlog(self, tenant: str) -> str:
        """List: ids of a tenant's batch runs waiting to be dispatched, oldest first."""
        return self._k("backlog", "runs", tenant)

    @property
    def backlogged(self) -> str:
        """Set: tenants whose backlog is not empty."""
        return self._k("backlog", "tenants")

    @property
    def backlog_runs(self) -> str:
        """Hash: tenant -> batch runs with a compact record (in its backlog, or popped and not yet
        created); changed in the same step as the records (fleet.scheduling.recount reads it)."""
        return self._k("backlog", "runs")

    @property
    def backlog_size(self) -> str:
        """Counter: entries in every tenant's backlog together."""
        return self._k("backlog", "size")

    @property
    def fair_vtime(self) -> str:
        """Sorted set: tenant -> virtual time, the batch model seconds it was charged over its weight."""
        return self._k("backlog", "vtime")

    @property
    def fair_clock(self) -> str:
        """String: the virtual time of the tenant dispatched last (where a lone newcomer starts)."""
        return self._k("backlog", "clock")

    @property
    def fair_estimate(self) -> str:
        """Hash: ``run_model_s``, the recent model seconds of a batch run (in-flight runs' charge)."""
        return self._k("backlog", "estimate")

    @property
    def dispatched(self) -> str:
        """Hash: run id -> tenant, batch runs dispatched from the backlog that have not ended."""
        return self._k("backlog", "dispatched")

    @property
    def dispatching(self) -> str:
        """Sorted set: runs popped from a backlog and not yet created, scored by the pop's time
        (a dispatcher that died in between leaves them here; the next one sends them)."""
        return self._k("backlog", "dispatching")

    @property
    def dispatch_lock(self) -> str:
        """String with TTL: held by the one worker that dispatches the backlog."""
        return self._k("backlog", "lock")

    def batch_job(self, tenant: str, batch_id: str) -> str:
        """Hash: a tenant's batch job (agent, created_at)."""
        return self._k("batch", tenant, batch_id)

    def batch_runs(self, tenant: str, batch_id: str) -> str:
        """List: ids of the runs a batch job created, in submission order."""
        return self._k("batch", tenant, batch_id, "runs")

    # --- dead letters -----------------------------------------------------------------
    @property
    def dead_letters(self) -> str:
        """Stream: dead-lettered steps, capped."""
        return self._k("deadletter")

    @property
    def dead_letter_replays(self) -> str:
        """Hash: entry id -> JSON list of its replays."""
        return self._k("deadletter", "replays")

    # --- the inference pool -------------------------------------------------------------
    def replica(self, name: str) -> str:
        """Hash: a replica's state (up or down, since, why), its sequence capacity, the pipeline
        depth in use, its engine's last running/waiting counts, peaks and preemptions (fleet.inference.replicas)."""
        return self._k("pool", "replica", name)

    def leases(self, replica: str, priority: str) -> str:
        """Sorted set: requests of a class in flight at a replica, members ``<dispatch ms>:<token>``
        (``np:`` in front when it must not be preempted), scored by their holder's last heartbeat."""
        return self._k("pool", "leases", replica, priority)

    def starting(self, replica: str) -> str:
        """Sorted set: interactive requests at a replica that have not produced their first
        token yet, scored by expiry (batch sends that replica nothing new meanwhile)."""
        return self._k("pool", "starting", replica)

    def prefix_index(self, replica: str) -> str:
        """Sorted set: hashes of the prompt blocks the router sent a replica, scored by when (the
        prefix of a prompt a little later than its tail); trimmed to the replica's KV cache size."""
        return self._k("pool", "prefix", replica)

    def route_waiters(self, replica: str) -> str:
        """Sorted set: batch calls waiting for a slot at this replica (their prompt's prefix is
        cached there), scored by expiry; the router leaves free slots elsewhere to the others."""
        return self._k("pool", "route_waiters", replica)

    def route_turn(self) -> str:
        """Counter: the round-robin router's turn."""
        return self._k("pool", "route_turn")

    def slot_waiters(self, priority: str) -> str:
        """Sorted set: requests of a class waiting for a slot, scored by expiry (batch takes no slot
        while an interactive request waits)."""
        return self._k("pool", "waiting", priority)

    def interactive_demand(self, replica: str) -> str:
        """Sorted set: interactive in-flight samples ``<n>:<token>`` at a replica, scored by time
        (the 'reserve' policy keeps the recent peak free)."""
        return self._k("pool", "demand", replica)

    def admitted(self, priority: str) -> str:
        """Sorted set: admitted runs of a class that have not ended, scored by deadline
        (fleet.scheduling.admitted)."""
        return self._k("pool", "admitted", priority)

    def admitted_steps(self, priority: str) -> str:
        """Hash: run id -> llm steps, of the runs in :meth:`admitted`."""
        return self._k("pool", "admitted", priority, "steps")

    @property
    def pool_monitor_lock(self) -> str:
        """String with TTL: held by the one worker that probes replicas and reads their engines."""
        return self._k("pool", "monitor")

    def step_times(self, kind: str, priority: str) -> str:
        """List: recent step durations of a kind and class (admission's estimate)."""
        return self._k("stats", "step_s", kind, priority)

    def worker(self, node: str) -> str:
        """String with TTL: a live worker's queues and concurrency."""
        return self._k("workers", node)

    @property
    def workers_prefix(self) -> str:
        return self._k("workers", "")

    @property
    def waits(self) -> str:
        """Sorted set: runs parked at a wait step, scored by when their wait times out (fleet.run.waits)."""
        return self._k("runs", "waits")

    @property
    def reconcile_lock(self) -> str:
        """String with TTL: held by the one worker sweeping for stalled runs."""
        return self._k("reconcile", "lock")

    # --- durability -------------------------------------------------------------------
    @property
    def replication_barrier(self) -> str:
        """Counter: written after a write that must survive a failover, so that Redis WAIT (which
        counts the replicas holding the connection's last write) covers it
        (fleet.core.replication)."""
        return self._k("replicated")

    # --- channels ---------------------------------------------------------------------
    @property
    def cancel_channel(self) -> str:
        """Pub/sub: ids of cancelled runs; inference workers cancel their calls."""
        return self._k("cancel")

    @property
    def preempt_channel(self) -> str:
        """Pub/sub: lease tokens of batch requests an interactive one took the slot of."""
        return self._k("pool", "preempt")

    @property
    def slot_channel(self) -> str:
        """Pub/sub: a replica whose slot freed (or that came back up); waiting requests try again."""
        return self._k("pool", "freed")
