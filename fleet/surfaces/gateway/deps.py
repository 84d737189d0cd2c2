"""What the gateway's routes are handed: the fleet's clients, and the same clients acting for
the caller its API key names (:mod:`fleet.surfaces.gateway.auth`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from fleet.errors import RunNotFound
from fleet.inference.triton import TritonClient
from fleet.scheduling.admission import Admission
from fleet.settings import Settings
from fleet.surfaces.aio import AsyncFleetClient
from fleet.surfaces.client import FleetClient
from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.models import RunId
from fleet.tenants import Caller


@dataclass
class FleetServices:
    client: FleetClient
    admission: Admission
    aio: AsyncFleetClient
    triton: list[TritonClient]  # one per replica of the inference pool
    settings: Settings


def _services(request: Request) -> FleetServices:
    return request.app.state.services


Services = Annotated[FleetServices, Depends(_services)]


@dataclass
class _Scoped:
    """The clients of one call, acting for its caller: another tenant's runs, sessions, dead
    letters and batches do not exist for them. Made when first used (a call refused for a
    bad path never touches the fleet)."""

    caller: Caller
    services: FleetServices

    @property
    def client(self) -> FleetClient:
        return self.services.client.scoped(self.caller)

    @property
    def aio(self) -> AsyncFleetClient:
        return self.services.aio.scoped(self.caller)


def _scoped(services: Services, caller: Annotated[Caller, Depends(require_key)]) -> _Scoped:
    return _Scoped(caller, services)


Scoped = Annotated[_Scoped, Depends(_scoped)]


async def known_run(run_id: RunId, scoped: Scoped) -> str:
    """The whole id of the path's run (a short id resolved), once its run is known to exist and
    to be the caller's to see."""
    # Checked before an event stream starts: once it has, the status can no longer be 404.
    full = await scoped.aio.resolve(run_id)
    if not await scoped.aio.exists(full):
        raise RunNotFound(f"no run '{run_id}'")
    return full
