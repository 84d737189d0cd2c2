"""``/healthz`` and ``/readyz``: probes, without a key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from fleet.surfaces.gateway.deps import Services
from fleet.surfaces.gateway.models import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health()


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Redis or the Triton model is not ready."}})
def readyz(services: Services) -> JSONResponse:
    """Redis answers and the Triton model is ready."""
    try:
        redis_up = bool(services.client.store.redis.ping())
    except Exception:  # noqa: BLE001 - any failure means not ready
        redis_up = False
    model = services.settings.triton_model
    model_up = any(t.model_ready(model) for t in services.triton)
    body = Readiness(ready=redis_up and model_up, redis=redis_up, triton_model=model_up, model=model)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
