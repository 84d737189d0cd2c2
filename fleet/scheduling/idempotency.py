"""Idempotency keys: a tenant's key names one submission, and so one run.

A key holds ``<run id> <fingerprint>`` (:func:`fleet.scheduling.submission.fingerprint`): the
same key with the same submission answers the same run; with another submission it is a
conflict (:class:`fleet.errors.IdempotencyConflict`), not a new run.
"""

from __future__ import annotations

from typing import Any

import redis

from fleet.errors import IdempotencyConflict
from fleet.settings import Settings


def named_run(idempotency_key: str, held: str, print_: str) -> str:
    """The run a repeated key names, if the submission is the same as the one that made it."""
    run_id, _, made_by = held.partition(" ")
    if made_by and made_by != print_:
        raise IdempotencyConflict(
            f"idempotency key '{idempotency_key}' already names run {run_id}, made by a different "
            "submission (agent, input or options differ): use a new key for a new run")
    return run_id


class IdempotencyKeys:
    """The idempotency keys of one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client

    def key(self, tenant: str, idempotency_key: str) -> str:
        return self.settings.keys.idempotency(tenant, idempotency_key)

    def seen(self, tenant: str, idempotency_key: str | None, print_: str) -> str | None:
        """The run an already used key names (None for a new key, or no key)."""
        if idempotency_key is None:
            return None
        held = self.redis.get(self.key(tenant, idempotency_key))
        return None if held is None else named_run(idempotency_key, held, print_)

    def claim(self, tenant: str, idempotency_key: str, run_id: str, print_: str) -> str | None:
        """Bind the key to ``run_id``; None when bound, else the run it already names."""
        key = self.key(tenant, idempotency_key)
        if self.redis.set(key, f"{run_id} {print_}", nx=True, ex=self.settings.run_ttl_s):
            return None
        held = self.redis.get(key)
        if held is None:  # expired between the two calls: claim it again
            return self.claim(tenant, idempotency_key, run_id, print_)
        return named_run(idempotency_key, held, print_)

    def release(self, tenant: str, *idempotency_keys: str) -> None:
        """Unbind keys whose runs were never queued."""
        if idempotency_keys:
            self.redis.delete(*[self.key(tenant, k) for k in idempotency_keys])

    def claim_many(self, pipe: Any, tenant: str, claims: list[tuple[str, str, str]]) -> list[Any]:
        """Try to bind many keys in one round trip: ``(key, run id, fingerprint)`` each; the
        replies (True where bound, an exception where Redis refused)."""
        for idempotency_key, run_id, print_ in claims:
            pipe.set(self.key(tenant, idempotency_key), f"{run_id} {print_}", nx=True, ex=self.settings.run_ttl_s)
        return pipe.execute(raise_on_error=False)
