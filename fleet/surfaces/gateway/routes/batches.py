"""``/v1/batches``: submit a batch of runs at batch priority, and count its runs by status."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from fleet.errors import FleetError
from fleet.run.jobs import BATCH_ID_PATTERN, BatchStatus, new_batch_id
from fleet.surfaces.batch import idempotency_key
from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Scoped
from fleet.surfaces.gateway.errors import ERRORS, ErrorBody
from fleet.surfaces.gateway.models import BatchItemError, BatchRequest, BatchResponse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=[Depends(require_key)])

_SHED = {429: {"model": ErrorBody, "description": "Shed, or over one of the tenant's quotas (`quota` names "
               "it): retry after the Retry-After header."}}
_NO_BATCH = {404: {"model": ErrorBody, "description": "No such batch (or not the caller's tenant's)."}}


@router.post("", status_code=201, response_model=BatchResponse, responses={**ERRORS, **_SHED})
def submit_batch(body: BatchRequest, scoped: Scoped) -> BatchResponse:
    """Submit a batch of runs of one agent at batch priority. They wait in the tenant's
    backlog and reach the model by fair share between tenants; items that cannot be
    admitted are listed in `errors`, the others are queued."""
    batch_id = body.batch_id or new_batch_id()
    entries = body.entries()
    subs = [{"agent": body.agent, "input": e.input, "priority": "batch", "deadline_s": body.deadline_s,
             "idempotency_key": idempotency_key(body.agent, None if e.id is None else str(e.id), e.input,
                                                batch_id)}
            for e in entries]
    results = scoped.client.submit_many(subs, batch_id=batch_id)
    errors = [BatchItemError(index=i, id=e.id, error=str(r.error), field=getattr(r.error, "field", None))
              for i, (e, r) in enumerate(zip(entries, results)) if isinstance(r.error, FleetError)]
    log.info("batch %s: %d items over HTTP, %d not admitted", batch_id, len(entries), len(errors))
    return BatchResponse(batch_id=batch_id, run_ids=[r.run_id for r in results],
                         created=sum(r.created for r in results), errors=errors)


@router.get("/{batch_id}", response_model=BatchStatus, responses={**ERRORS, **_NO_BATCH})
def get_batch(batch_id: Annotated[str, Path(pattern=BATCH_ID_PATTERN)], scoped: Scoped) -> BatchStatus:
    """A batch's runs counted by status."""
    return scoped.client.batch_status(batch_id)
