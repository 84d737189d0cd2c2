"""The gateway's app and routes (see :mod:`fleet.surfaces.gateway`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet.core import tracing
from fleet.scheduling.admission import Admission
from fleet.scheduling.submission import Submission
from fleet.surfaces.batch import idempotency_key
from fleet.surfaces.aio import AsyncFleetClient
from fleet.surfaces.client import FleetClient
from fleet.run.deadletter import DeadLetter
from fleet.errors import FleetError, RunNotFound
from fleet.surfaces.gateway.auth import LoopbackOnly, check_bind, require_key
from fleet.surfaces.gateway.errors import CONFLICT, ERRORS, NOT_FOUND, ErrorBody, as_json, install_error_handlers
from fleet.surfaces.gateway.middleware import BodyLimit, count_requests
from fleet.run.jobs import BATCH_ID_PATTERN, BatchStatus, new_batch_id
from fleet.run.records import RunStatus
from fleet.settings import Settings
from fleet.tenants import Caller
from fleet.inference.triton import TritonClient
from fleet.surfaces.views import RUN_ID_PATTERN, AgentList, RunView, TenantReport, agent_infos, run_view

log = logging.getLogger(__name__)

# A Redis stream id ("<ms>-<seq>", or "<ms>"): anything else would make XREAD fail.
_STREAM_ID = r"^\d{1,20}(-\d{1,20})?$"

RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="A run id (32 hex digits).")]
EntryId = Annotated[str, Path(pattern=_STREAM_ID, description="A dead-letter entry id (<ms>-<seq>).")]


class SubmitResponse(BaseModel):
    """The run a submission created, or the run its idempotency key already names."""

    run_id: str
    status: RunStatus | None = Field(description="Null when the run's record is no longer kept.")
    created: bool = Field(description="False for a repeated idempotency key.")
    trace_id: str | None = Field(None, description="The run's trace id, when the fleet traces.")


class CancelResponse(BaseModel):
    """The outcome of a cancel."""

    run_id: str
    cancelled: bool = Field(description="False when the run had already ended.")
    status: RunStatus


class SessionView(BaseModel):
    session_id: str
    turns: list[dict[str, Any]] = Field(description="Each finished run's input and result, oldest first.")


class DeadLetterList(BaseModel):
    entries: list[DeadLetter]


class DeadLetterView(BaseModel):
    entry: DeadLetter
    replays: list[dict[str, Any]] = Field(description="Each replay with its run's current outcome.")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patch: dict[str, Any] | None = Field(None, description='{"input": {...}} and/or {"steps": {name: output}}.')


class ReplayResponse(BaseModel):
    run_id: str
MAX_BATCH_ITEMS = 10_000


class BatchItem(BaseModel):
    """One input of a batch, with the caller's id for it."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(None, description="The caller's id of the item (makes its run unique in the batch).")
    input: dict[str, Any]


class BatchRequest(BaseModel):
    """A batch of runs of one agent, at batch priority: ``inputs``, or ``items`` with ids."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=128)
    inputs: list[dict[str, Any]] | None = Field(None, max_length=MAX_BATCH_ITEMS)
    items: list[BatchItem] | None = Field(None, max_length=MAX_BATCH_ITEMS)
    batch_id: str | None = Field(
        None, pattern=BATCH_ID_PATTERN,
        description="Submitting again under the same id returns the same runs; a fresh id when unset.")
    deadline_s: float | None = Field(None, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _one_list(self) -> "BatchRequest":
        if (self.inputs is None) == (self.items is None):
            raise ValueError("give either inputs or items")
        return self

    def entries(self) -> list[BatchItem]:
        if self.items is not None:
            return self.items
        return [BatchItem(input=value) for value in self.inputs or []]


class BatchItemError(BaseModel):
    """An item that was not admitted, and why."""

    index: int
    id: str | int | None = None
    error: str
    field: str | None = None


class BatchResponse(BaseModel):
    """The runs of a batch, in the order of its items (null where an item was not admitted)."""

    batch_id: str
    run_ids: list[str | None]
    created: int = Field(description="Runs created by this request (the others already existed).")
    errors: list[BatchItemError]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    redis: bool
    triton_model: bool
    model: str


@dataclass
class _Services:
    client: FleetClient
    admission: Admission
    aio: AsyncFleetClient
    triton: list[TritonClient]  # one per replica of the inference pool


def _services(request: Request) -> _Services:
    return request.app.state.services


Services = Annotated[_Services, Depends(_services)]


@dataclass
class _Scoped:
    """The clients of one call, acting for its caller: another tenant's runs, sessions, dead
    letters and batches do not exist for them. Made when first used (a call refused for a
    bad path never touches the fleet)."""

    caller: Caller
    services: _Services

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
    """The path's run id, once its run is known to exist (and to be the caller's to see)."""
    # Checked before an event stream starts: once it has, the status can no longer be 404.
    if not await scoped.aio.exists(run_id):
        raise RunNotFound(f"no run '{run_id}'")
    return run_id


def create_gateway(settings: Settings) -> FastAPI:
    """The gateway's ASGI app for one fleet.

    Connections (Redis, the broker, Triton) are opened when the app starts and closed
    when it stops.
    """
    keys = settings.tenant_registry.has_keys
    tracing.configure(settings, "gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = FleetClient(settings)
        services = _Services(
            client=client,
            admission=Admission(settings, client.app, client.agents, client.store),
            aio=AsyncFleetClient(settings, sync=client),
            triton=[TritonClient(r.grpc_url) for r in settings.replicas()],
        )
        app.state.services = services
        log.info("gateway up: %d agents, %d tenants, %s", len(client.agents),
                 len(settings.tenant_registry.names()), "API keys" if keys else "no API keys (loopback only)")
        try:
            yield
        finally:
            await services.aio.close()
            for triton in services.triton:
                triton.close()
            client.close()

    # With keys, the schema is served behind a key below and the browsable docs are off
    # (a browser fetching the schema for them carries no key).
    open_docs = not keys
    app = FastAPI(
        title="fleet gateway",
        summary="Submit agent runs to the fleet and follow them.",
        version="1",
        lifespan=lifespan,
        openapi_url="/openapi.json" if open_docs else None,
        docs_url="/docs" if open_docs else None,
        redoc_url="/redoc" if open_docs else None,
    )
    app.state.tenants = settings.tenant_registry
    # Middleware added later runs earlier: the request counter sees every answer (403 and
    # 413 included), and a client that may not call is refused before its body is read.
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes)
    if not keys:
        app.add_middleware(LoopbackOnly)
    registry = app.state.metrics = count_requests(app, settings)
    keyed = [Depends(require_key)]
    v1: dict[str, Any] = dict(dependencies=keyed, tags=["runs"])

    @app.post("/v1/runs", status_code=201, response_model=SubmitResponse, **v1,
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

    @app.get("/v1/runs/{run_id}", response_model=RunView, **v1, responses={**ERRORS, **NOT_FOUND})
    def get_run(run_id: RunId, scoped: Scoped) -> dict[str, Any]:
        """A run: status, per-step timing, tokens and cost, its timeline (queue wait, time to
        first token, generation, tool time, retries, preemptions per step), result or error."""
        return run_view(scoped.client.get(run_id))

    @app.get("/v1/runs/{run_id}/events", response_class=EventSourceResponse, **v1,
             responses=as_json({**ERRORS, **NOT_FOUND}))
    async def run_events(
        run_id: Annotated[str, Depends(known_run)],
        scoped: Scoped,
        last_event_id: Annotated[str | None, Header(
            pattern=_STREAM_ID, description="Resume after this event id (sent back by EventSource).")] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """The run's events as server-sent events, until the run ends.

        Each event is `event: <type>` (status, step, token), `id: <stream id>` and
        `data: <JSON of the event's fields>`. The stream ends after the run's terminal status.
        """
        log.debug("run %s: event stream opened after %s", run_id, last_event_id or "the start")
        async for event_id, fields in scoped.aio.entries(run_id, after=last_event_id or "0"):
            yield ServerSentEvent(id=event_id, event=fields.get("type", "message"), data=fields)
        log.debug("run %s: event stream ended", run_id)

    @app.delete("/v1/runs/{run_id}", response_model=CancelResponse, **v1, responses={**ERRORS, **NOT_FOUND})
    def cancel_run(run_id: RunId, scoped: Scoped) -> CancelResponse:
        """Cancel a run: its remaining steps are skipped and an in-flight model call is cancelled."""
        cancelled = scoped.client.cancel(run_id)
        status = scoped.client.get(run_id).status
        log.info("run %s: cancel over HTTP (%s)", run_id, "cancelled" if cancelled else f"already {status}")
        return CancelResponse(run_id=run_id, cancelled=cancelled, status=status)

    @app.get("/v1/sessions/{session_id}", response_model=SessionView, **{**v1, "tags": ["sessions"]},
             responses={**ERRORS, **NOT_FOUND})
    def get_session(session_id: Annotated[str, Path(min_length=1, max_length=256)], scoped: Scoped) -> SessionView:
        """The turns of one of the tenant's sessions (input and result of each run), oldest first."""
        return SessionView(session_id=session_id, turns=scoped.client.session(session_id))

    dl = {**v1, "tags": ["dead letters"]}

    @app.get("/v1/dead-letters", response_model=DeadLetterList, **dl, responses=ERRORS)
    def list_dead_letters(scoped: Scoped, agent: str | None = None, step: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeadLetterList:
        """The tenant's dead-lettered steps (an operator's key: every tenant's), newest first."""
        return DeadLetterList(entries=scoped.client.dlq_list(agent=agent, step=step, limit=limit))

    @app.get("/v1/dead-letters/{entry_id}", response_model=DeadLetterView, **dl, responses={**ERRORS, **NOT_FOUND})
    def get_dead_letter(entry_id: EntryId, scoped: Scoped) -> DeadLetterView:
        """One dead-lettered step: the state it received, its error and traceback, its replays."""
        entry, replays = scoped.client.dlq_get(entry_id)
        return DeadLetterView(entry=entry, replays=replays)

    @app.post("/v1/dead-letters/{entry_id}/replay", response_model=ReplayResponse, **dl,
              responses={**ERRORS, **NOT_FOUND})
    def replay_dead_letter(entry_id: EntryId, scoped: Scoped, body: ReplayRequest | None = None) -> ReplayResponse:
        """Re-run the entry's run from its failed step with the stored state; `patch` merges
        into the input (`{"input": {...}}`) or replaces earlier steps' outputs (`{"steps": {...}}`)."""
        run_id = scoped.client.dlq_replay(entry_id, body.patch if body is not None else None)
        return ReplayResponse(run_id=run_id)

    @app.get("/v1/tenants", response_model=TenantReport, **{**v1, "tags": ["tenants"]}, responses=ERRORS)
    def list_tenants(scoped: Scoped, window_s: Annotated[float, Query(gt=0, le=8 * 86400)] = 900.0) -> TenantReport:
        """Per tenant: runs queued and in flight, its backlog, model time and part of batch model
        time in the window, tokens today and quotas. A tenant's key sees its own row only."""
        return scoped.client.tenants(window_s)
    batches: dict[str, Any] = {**v1, "tags": ["batches"]}

    shed = {429: {"model": ErrorBody, "description": "Shed, or over one of the tenant's quotas (`quota` names "
                  "it): retry after the Retry-After header."}}

    @app.post("/v1/batches", status_code=201, response_model=BatchResponse, **batches, responses={**ERRORS, **shed})
    def submit_batch(body: BatchRequest, scoped: Scoped) -> BatchResponse:
        """Submit a batch of runs of one agent at batch priority. They wait in the tenant's
        backlog and reach the model by fair share between tenants; items that cannot be
        admitted are listed in `errors`, the others are queued."""
        client = scoped.client
        batch_id = body.batch_id or new_batch_id()
        entries = body.entries()
        subs = [{"agent": body.agent, "input": e.input, "priority": "batch", "deadline_s": body.deadline_s,
                 "idempotency_key": idempotency_key(body.agent, None if e.id is None else str(e.id), e.input,
                                                    batch_id)}
                for e in entries]
        results = client.submit_many(subs, batch_id=batch_id)
        errors = [BatchItemError(index=i, id=e.id, error=str(r.error), field=getattr(r.error, "field", None))
                  for i, (e, r) in enumerate(zip(entries, results)) if isinstance(r.error, FleetError)]
        log.info("batch %s: %d items over HTTP, %d not admitted", batch_id, len(entries), len(errors))
        return BatchResponse(batch_id=batch_id, run_ids=[r.run_id for r in results],
                             created=sum(r.created for r in results), errors=errors)

    no_batch = {404: {"model": ErrorBody, "description": "No such batch (or not the caller's tenant's)."}}

    @app.get("/v1/batches/{batch_id}", response_model=BatchStatus, **batches, responses={**ERRORS, **no_batch})
    def get_batch(batch_id: Annotated[str, Path(pattern=BATCH_ID_PATTERN)], scoped: Scoped) -> BatchStatus:
        """A batch's runs counted by status."""
        return scoped.client.batch_status(batch_id)

    @app.get("/v1/agents", response_model=AgentList, **{**v1, "tags": ["agents"]}, responses=ERRORS)
    def list_agents(services: Services) -> AgentList:
        """Agents with their steps, input schema and an example input."""
        return AgentList(agents=agent_infos(services.client.agents))

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is up."""
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["health"],
             responses={503: {"model": Readiness, "description": "Redis or the Triton model is not ready."}})
    def readyz(services: Services) -> JSONResponse:
        """Redis answers and the Triton model is ready."""
        try:
            redis_up = bool(services.client.store.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means not ready
            redis_up = False
        model_up = any(t.model_ready(settings.triton_model) for t in services.triton)
        body = Readiness(ready=redis_up and model_up, redis=redis_up, triton_model=model_up,
                         model=settings.triton_model)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/metrics", include_in_schema=False, dependencies=keyed)
    def metrics_endpoint() -> Response:
        """Prometheus metrics: the gateway's requests and the fleet-wide queue gauges (with
        API keys set, the scrape carries one; ``FLEET_METRICS_PORT`` serves them keyless on a
        port of their own)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if not open_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
        def openapi_schema() -> JSONResponse:
            """The OpenAPI schema, for callers holding a key."""
            return JSONResponse(app.openapi())

    install_error_handlers(app)
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the gateway in the foreground (uvicorn) until interrupted.

    Args:
        settings: the fleet's settings (API keys, body limit, Redis, Triton).
        host: address to listen on; ``FLEET_BIND_ADDRESS`` when None.
        port: port to listen on; ``FLEET_GATEWAY_PORT`` when None.

    Raises:
        InsecureBind: listening beyond loopback without API keys.
    """
    import uvicorn

    host = host or settings.bind_address
    port = port or settings.gateway_port
    check_bind(settings, host)
    app = create_gateway(settings)
    if settings.metrics_port is not None:
        # Beside the keyed /metrics: a port of its own for the monitoring network, as the
        # workers have, so that a scrape needs no API key.
        start_http_server(settings.metrics_port, addr=settings.bind_address, registry=app.state.metrics)
        log.info("gateway metrics on http://%s:%d/metrics", settings.bind_address, settings.metrics_port)
    log.info("gateway listening on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port,
                log_level=settings.log_level.lower(), server_header=False)
