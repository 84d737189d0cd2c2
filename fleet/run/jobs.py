"""Batch jobs: a tenant's named set of batch runs, and where they stand.

A job is opened when runs are first submitted under its id (``FleetClient.submit_many``,
``fleet batch run``, ``POST /v1/batches``); the runs carry its id in their ``batch`` field and
its run list keeps their ids in submission order. Its id belongs to its tenant: another
tenant is told it does not exist.
"""

from __future__ import annotations

import re
import time
import uuid

from pydantic import BaseModel, Field

from fleet.errors import InvalidSubmission, RunNotFound
from fleet.run.records import TERMINAL
from fleet.run.store import RunStore
from fleet.settings import Settings
from fleet.tenants import Caller

BATCH_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_READ_CHUNK = 5000


class BatchStatus(BaseModel):
    """A batch job's runs, counted by status."""

    batch_id: str
    tenant: str
    created_at: float
    runs: int = Field(description="Runs the job created.")
    counts: dict[str, int] = Field(description="Runs by status; 'missing' for records no longer kept.")
    done: bool = Field(description="Every run has ended.")


def new_batch_id() -> str:
    """A fresh batch id."""
    return uuid.uuid4().hex


def check_batch_id(batch_id: str) -> str:
    """``batch_id`` if it is a valid id, else :class:`InvalidSubmission` naming the field."""
    if not re.match(BATCH_ID_PATTERN, batch_id):
        raise InvalidSubmission("batch_id: 1 to 128 letters, digits or '_.:-', starting with a letter or digit",
                                "batch_id")
    return batch_id


class BatchJobs:
    """The batch jobs of one fleet namespace."""

    def __init__(self, settings: Settings, store: RunStore) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.store = store
        self.redis = store.redis

    def open(self, tenant: str, batch_id: str) -> None:
        """Open a tenant's job (or keep the one of that id)."""
        key = self.keys.batch_job(tenant, check_batch_id(batch_id))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(key, "created_at", repr(time.time()))
        pipe.expire(key, self.settings.run_ttl_s)
        pipe.execute()

    def owner(self, caller: Caller, batch_id: str) -> str:
        """The tenant of the job ``batch_id`` that ``caller`` may see; :class:`RunNotFound` when none."""
        tenants = self.settings.tenant_registry.names() if caller.admin else [caller.tenant]
        if caller.admin and caller.tenant not in tenants:
            tenants.append(caller.tenant)
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.exists(self.keys.batch_job(tenant, batch_id))
        for tenant, found in zip(tenants, pipe.execute()):
            if found:
                return tenant
        raise RunNotFound(f"no batch '{batch_id}'")

    def status(self, caller: Caller, batch_id: str) -> BatchStatus:
        """Where the job's runs stand; :class:`RunNotFound` for an unknown id or another tenant's."""
        tenant = self.owner(caller, batch_id)
        created_at = float(self.redis.hget(self.keys.batch_job(tenant, batch_id), "created_at") or 0.0)
        runs_key = self.keys.batch_runs(tenant, batch_id)
        counts: dict[str, int] = {}
        total = 0
        start = 0
        while True:
            ids = self.redis.lrange(runs_key, start, start + _READ_CHUNK - 1)
            for status in self.store.statuses(ids):
                name = status or "missing"
                counts[name] = counts.get(name, 0) + 1
            total += len(ids)
            if len(ids) < _READ_CHUNK:
                break
            start += _READ_CHUNK
        done = all(s in TERMINAL or s == "missing" for s in counts)
        return BatchStatus(batch_id=batch_id, tenant=tenant, created_at=created_at, runs=total,
                           counts=dict(sorted(counts.items())), done=done)
