"""``/v1/tenants``: the tenants' view."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Scoped
from fleet.surfaces.gateway.errors import ERRORS
from fleet.surfaces.views import TenantReport

router = APIRouter(prefix="/v1/tenants", tags=["tenants"], dependencies=[Depends(require_key)])


@router.get("", response_model=TenantReport, responses=ERRORS)
def list_tenants(scoped: Scoped, window_s: Annotated[float, Query(gt=0, le=8 * 86400)] = 900.0) -> TenantReport:
    """Per tenant: runs queued and in flight, its backlog, model time and part of batch model
    time in the window, tokens today and quotas. A tenant's key sees its own row only."""
    return scoped.client.tenants(window_s)
