"""``/v1/runs``: submit a run, list runs, read one, follow its events, signal it, cancel it. A run id in a
path may be short: its first 6 or more hex digits, when they start one visible run's id."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import JsonValue

from fleet.core import tracing
from fleet.errors import RunNotFound
from fleet.run.index import RunQuery
from fleet.scheduling.submission import Submission
from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Scoped, Services, known_run
from fleet.surfaces.gateway.errors import CONFLICT, ERRORS, NOT_FOUND, ErrorBody, as_json
from fleet.surfaces.gateway.models import STREAM_ID, CancelResponse, RunId, SignalResponse, SubmitResponse
from fleet.surfaces.views import RunList, RunView, run_view

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[Depends(require_key)])


@router.post("", status_code=201, response_model=SubmitResponse,
             responses={200: {"model": SubmitResponse, "description": "The run of a repeated idempotency key."},
                        **ERRORS, **CONFLICT,
                        429: {"model": ErrorBody, "description": "Shed, or over one of the tenant's quotas "
                              "(`quota` names it): retry after the Retry-After header."}})
def submit_run(sub: Submission, request: Request, response: Response, services: Services,
               scoped: Scoped) -> SubmitResponse:
    """Submit a run of an agent, as the key's tenant. A W3C `traceparent` header makes the
    run's trace part of the caller's. A repeated idempotency key answers the run it named
    (200), or 409 when the submission differs from the one that made it."""
    with tracing.server("POST /v1/runs", request.headers, {"http.request.method": "POST",
                                                            "http.route": "/v1/runs"}):
        run_id, created = services.admission.submit(sub, scoped.caller.tenant)
    if not created:
        response.status_code = 200
    try:
        run = scoped.client.get(run_id)
        status, trace_id = run.status, run.trace_id
    except RunNotFound:  # the key outlived the finished run's record
        status = trace_id = None
    log.info("run %s: submitted over HTTP (%s)", run_id,
             "created" if created else "existing run of its idempotency key")
    return SubmitResponse(run_id=run_id, status=status, created=created, trace_id=trace_id)


@router.get("", response_model=RunList, responses=ERRORS)
def list_runs(q: Annotated[RunQuery, Query()], scoped: Scoped) -> RunList:
    """Runs the key may see, newest first: filtered by status (repeat the parameter for several),
    agent, class (`priority`), tenant (an operator's filter: a tenant's key sees its own runs
    only), creation time (`since`, `until`: Unix seconds) and the text of the error; `limit` runs
    a page, and `next_cursor` passed as `cursor` gives the next. Batch runs still in the backlog
    are listed once dispatched (`backlog` counts them)."""
    return scoped.client.runs(**q.model_dump())


@router.get("/{run_id}", response_model=RunView, responses={**ERRORS, **NOT_FOUND})
def get_run(run_id: RunId, scoped: Scoped) -> dict[str, Any]:
    """A run: status, per-step timing, tokens and cost, its timeline (queue wait, time to
    first token, generation, tool time, retries, preemptions per step), result or error."""
    return run_view(scoped.client.get(run_id))


@router.get("/{run_id}/events", response_class=EventSourceResponse, responses=as_json({**ERRORS, **NOT_FOUND}))
async def run_events(
    run_id: Annotated[str, Depends(known_run)],
    scoped: Scoped,
    last_event_id: Annotated[str | None, Header(
        pattern=STREAM_ID, description="Resume after this event id (sent back by EventSource).")] = None,
) -> AsyncIterator[ServerSentEvent]:
    """The run's events as server-sent events, until the run ends.

    Each event is `event: <type>` (status, step, token), `id: <stream id>` and
    `data: <JSON of the event's fields>`. The stream ends after the run's terminal status.
    """
    log.debug("run %s: event stream opened after %s", run_id, last_event_id or "the start")
    async for event_id, fields in scoped.aio.entries(run_id, after=last_event_id or "0"):
        yield ServerSentEvent(id=event_id, event=fields.get("type", "message"), data=fields)
    log.debug("run %s: event stream ended", run_id)


@router.delete("/{run_id}", response_model=CancelResponse, responses={**ERRORS, **NOT_FOUND})
def cancel_run(run_id: RunId, scoped: Scoped) -> CancelResponse:
    """Cancel a run: its remaining steps are skipped and an in-flight model call is cancelled."""
    run_id = scoped.client.resolve(run_id)
    cancelled = scoped.client.cancel(run_id)
    status = scoped.client.get(run_id).status
    log.info("run %s: cancel over HTTP (%s)", run_id, "cancelled" if cancelled else f"already {status}")
    return CancelResponse(run_id=run_id, cancelled=cancelled, status=status)


@router.post("/{run_id}/signals/{name}", response_model=SignalResponse, responses={**ERRORS, **NOT_FOUND})
def signal_run(run_id: RunId, name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_.-]*$", max_length=64)],
               scoped: Scoped, payload: Annotated[JsonValue, Body()] = None) -> SignalResponse:
    """Deliver the signal `name` with a JSON payload (the body): a run parked on it at a wait step
    resumes, and its next steps read the payload as that step's output; a signal that comes before
    its wait is kept for it. Another tenant's run is a 404."""
    run_id = scoped.client.resolve(run_id)
    outcome = scoped.client.signal(run_id, name, payload)
    return SignalResponse(run_id=run_id, signal=name, outcome=outcome, status=scoped.client.get(run_id).status)
