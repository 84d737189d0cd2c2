"""Every Redis key and channel the fleet writes, side by side.

All of them live under ``FLEET_KEY_PREFIX`` (queues have their own prefix, see
:mod:`fleet.routing`), so several fleets can share one Redis. What a key holds is written
next to it; only :mod:`fleet.runs` knows the fields inside a run hash.
"""

from __future__ import annotations


class Keys:
    """The key names of one fleet namespace."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- runs -------------------------------------------------------------------------
    def run(self, run_id: str) -> str:
        """Hash: the run's fields, step outputs and step records (see fleet.runs)."""
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

    def idempotency(self, key: str) -> str:
        """String: the run id an idempotency key names."""
        return self._k("idem", key)

    def session(self, session_id: str) -> str:
        """List: the turns of a session, oldest first."""
        return self._k("session", session_id)

    def usage(self, minute: int) -> str:
        """Hash with TTL: what runs used in one minute (epoch minute), fields
        ``<agent>|<class>|<figure>`` (see fleet.usage)."""
        return self._k("usage", str(minute))

    # --- dead letters -----------------------------------------------------------------
    @property
    def dead_letters(self) -> str:
        """Stream: dead-lettered steps, capped."""
        return self._k("deadletter")

    @property
    def dead_letter_replays(self) -> str:
        """Hash: entry id -> JSON list of its replays."""
        return self._k("deadletter", "replays")

    # --- capacity and scheduling ------------------------------------------------------
    def inflight(self, priority: str) -> str:
        """Sorted set: leases of requests in flight at Triton, scored by expiry."""
        return self._k("inflight", priority)

    def inflight_peak(self, priority: str) -> str:
        """String: the most requests of a class ever in flight at once."""
        return self._k("inflight", priority, "peak")

    @property
    def interactive_demand(self) -> str:
        """Sorted set: samples ``<in flight>:<token>`` of interactive requests, scored by time
        (the work-conserving batch limit keeps a reserve of the recent peak)."""
        return self._k("inflight", "interactive", "demand")

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
    def reconcile_lock(self) -> str:
        """String with TTL: held by the one worker sweeping for stalled runs."""
        return self._k("reconcile", "lock")

    # --- channels ---------------------------------------------------------------------
    @property
    def cancel_channel(self) -> str:
        """Pub/sub: ids of cancelled runs; inference workers cancel their calls."""
        return self._k("cancel")
