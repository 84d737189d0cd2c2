"""Tenants: who a caller is, what it may see, and what it may queue.

Every API key belongs to a tenant (``FLEET_TENANTS``, or a mounted ``FLEET_TENANTS_FILE``):
its name, its weight in the fair share of batch model time, its keys and its quotas. Runs,
their events, sessions, idempotency keys, dead-letter entries and batch jobs belong to the
tenant that submitted them; another tenant is told they do not exist. Operators (an admin
key of ``FLEET_ADMIN_KEYS``, or the CLI on the fleet's host) see every tenant.

Without any configuration there is one tenant, ``default``: local use needs no keys, and the
keys of ``FLEET_API_KEYS`` are the default tenant's.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Quotas(BaseModel):
    """What one tenant may ask of the fleet; unset means no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_active_interactive: int | None = Field(
        None, ge=0, description="Interactive runs queued and in flight at once.")
    max_active_batch: int | None = Field(
        None, ge=0, description="Batch runs queued (the backlog included) and in flight at once.")
    submissions_per_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Runs submitted per second, on average.")
    submissions_burst: int | None = Field(
        None, gt=0, description="Runs submitted at once above that rate; the rate times one second when unset.")
    tokens_per_day: int | None = Field(
        None, ge=0, description="Model tokens (in + out) per UTC day; runs are refused once they are used.")

    def active_limit(self, priority: str) -> int | None:
        return self.max_active_interactive if priority == "interactive" else self.max_active_batch

    def burst(self) -> int:
        """Runs a tenant may submit at once (the token bucket's size)."""
        if self.submissions_burst is not None:
            return self.submissions_burst
        return max(1, int(self.submissions_per_s or 1))


class TenantSpec(BaseModel):
    """One tenant of the fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TENANT_PATTERN, description="Lower-case name: runs, metrics and keys carry it.")
    weight: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False,
                          description="Its share of batch model time, relative to the other backlogged tenants'.")
    keys: list[SecretStr] = Field(default_factory=list, description="Its API keys.")
    quotas: Quotas = Field(default_factory=Quotas)


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the tenant it acts as, and whether it is an operator who sees all."""

    tenant: str = DEFAULT_TENANT
    admin: bool = False

    def sees(self, tenant: str | None) -> bool:
        """Whether this caller may see what belongs to ``tenant`` (None: the default tenant)."""
        return self.admin or (tenant or DEFAULT_TENANT) == self.tenant


OPERATOR = Caller(DEFAULT_TENANT, admin=True)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Tenants:
    """The fleet's tenants and the keys that name them."""

    def __init__(self, specs: list[TenantSpec], default_keys: list[str] = (), admin_keys: list[str] = ()) -> None:
        by_name = {s.name: s for s in specs}
        if len(by_name) != len(specs):
            names = [s.name for s in specs]
            raise ValueError(f"tenant names must differ, got {sorted(names)}")
        by_name.setdefault(DEFAULT_TENANT, TenantSpec(name=DEFAULT_TENANT))
        self.by_name = by_name
        # Keys are looked up by digest: the table never holds them, and a lookup's time does
        # not depend on where a wrong key differs from a right one.
        self._callers: dict[str, Caller] = {}
        for spec in by_name.values():
            for key in spec.keys:
                self._add(key.get_secret_value(), Caller(spec.name), spec.name)
        for key in default_keys:
            self._add(key, Caller(DEFAULT_TENANT), DEFAULT_TENANT)
        for key in admin_keys:
            self._add(key, OPERATOR, "admin")

    def _add(self, key: str, caller: Caller, owner: str) -> None:
        digest = _digest(key)
        if digest in self._callers and self._callers[digest] != caller:
            raise ValueError(f"an API key of tenant '{owner}' is also another tenant's (or an admin key)")
        self._callers[digest] = caller

    @property
    def has_keys(self) -> bool:
        """Whether any key is configured (the gateway then needs one on every call)."""
        return bool(self._callers)

    def caller(self, key: str | None) -> Caller | None:
        """The caller a key names, or None for a missing or unknown key."""
        if not key:
            return None
        return self._callers.get(_digest(key))

    def get(self, name: str) -> TenantSpec:
        """A tenant by name; :class:`KeyError` with the known names when there is none."""
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"unknown tenant '{name}' (known: {', '.join(sorted(self.by_name))})") from None

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def weight(self, name: str) -> float:
        spec = self.by_name.get(name)
        return spec.weight if spec is not None else 1.0


def parse_tenants(value: Any, source: str) -> list[TenantSpec]:
    """Tenant specs from a JSON list (or ``{"tenants": [...]}``), raising ValueError naming ``source``
    and the tenant at fault."""
    if isinstance(value, dict):
        value = value.get("tenants", [])
    if not isinstance(value, list):
        raise ValueError(f"{source}: expected a list of tenants, got {type(value).__name__}")
    specs = []
    for i, item in enumerate(value):
        try:
            specs.append(TenantSpec.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            name = item.get("name", f"#{i}") if isinstance(item, dict) else f"#{i}"
            raise ValueError(f"{source}: tenant {name}: {where}: {err['msg']}") from None
    return specs


def read_tenants_file(path: Path) -> list[TenantSpec]:
    """Tenants from a mounted file: JSON, or TOML with ``[[tenants]]`` tables."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"FLEET_TENANTS_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"FLEET_TENANTS_FILE: {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    return parse_tenants(data, f"FLEET_TENANTS_FILE {path}")
