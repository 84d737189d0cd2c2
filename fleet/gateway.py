"""The HTTP gateway: apps that do not speak Python submit and follow runs over HTTP.

::

    POST   /v1/runs                 submit (201 created; 200 for a repeated idempotency key)
    GET    /v1/runs/{id}            the run's record, latency and token counts
    GET    /v1/runs/{id}/events     server-sent events until the run ends (Last-Event-ID resumes)
    DELETE /v1/runs/{id}            cancel
    GET    /v1/agents               agents, their steps, input schema and an example
    GET    /healthz                 the process is up
    GET    /readyz                  Redis answers and the Triton model is ready (503 otherwise)

With API keys set (``FLEET_API_KEYS``) every ``/v1`` call needs ``Authorization: Bearer
<key>`` or ``X-API-Key: <key>``. Without keys the gateway is for this machine only:
:func:`serve` refuses to listen beyond loopback and the app answers 403 to any client that
is not on loopback. Errors are JSON ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import time

import hmac
import ipaddress
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Request, Response, Security
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.admission import Admission, Submission
from fleet.aio import AsyncFleetClient
from fleet.client import FleetClient
from fleet.errors import InvalidSubmission, Overloaded, RunNotFound
from fleet.gauges import FleetCollector
from fleet.runs import RunRecord, RunStatus
from fleet.settings import Settings
from fleet.triton import TritonClient

log = logging.getLogger(__name__)

# A Redis stream id ("<ms>-<seq>", or "<ms>"): anything else would make XREAD fail.
_STREAM_ID = r"^\d{1,20}(-\d{1,20})?$"


class InsecureBind(ValueError):
    """The gateway was asked to listen beyond loopback without API keys."""


# --- response models -------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error the gateway answers."""

    error: str = Field(description="What is wrong, naming the field when one is to blame.")
    field: str | None = Field(None, description="Dotted path of the offending field, e.g. input.question.")
    retry_after_s: float | None = Field(None, description="With 429: when a retry has a fair chance.")


class SubmitResponse(BaseModel):
    """The run a submission created, or the run its idempotency key already names."""

    run_id: str
    status: RunStatus | None = Field(description="Null when the run's record is no longer kept.")
    created: bool = Field(description="False for a repeated idempotency key.")


class CancelResponse(BaseModel):
    """The outcome of a cancel."""

    run_id: str
    cancelled: bool = Field(description="False when the run had already ended.")
    status: RunStatus


# The run record as stored, plus what is derived from it (kept in step with RunRecord).
RunView = create_model(
    "RunView",
    __doc__="A run: its record, its latency once finished and its token counts.",
    **{name: (f.annotation, f) for name, f in RunRecord.model_fields.items()},
    latency_s=(float | None, Field(None, description="Submission to finish, once finished.")),
    tokens_in=(int, Field(0, description="Prompt tokens over all steps.")),
    tokens_out=(int, Field(0, description="Generated tokens over all steps.")),
)


class AgentStepInfo(BaseModel):
    name: str
    kind: str
    loop: str | None = Field(None, description="The loop step this step repeats in, if any.")


class AgentInfo(BaseModel):
    name: str
    description: str
    steps: list[AgentStepInfo]
    input_schema: dict[str, Any]
    example: dict[str, Any]


class AgentList(BaseModel):
    agents: list[AgentInfo]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    redis: bool
    triton_model: bool
    model: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    403: {"model": ErrorBody, "description": "Without API keys, only loopback clients are served."},
    413: {"model": ErrorBody, "description": "Request body over FLEET_GATEWAY_MAX_BODY_BYTES."},
    422: {"model": ErrorBody, "description": "Invalid request; `field` names what is wrong."},
    503: {"model": ErrorBody, "description": "The fleet's Redis is unreachable; retry after Retry-After."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such run."}}


def _as_json(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Error responses of a route whose own media type is not JSON (FastAPI would document
    them under the route's media type)."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {code: {"description": r["description"], "content": {"application/json": {"schema": ref}}}
            for code, r in responses.items()}


# --- pure helpers ----------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """Whether an address (or ``localhost``) is this machine's loopback."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def key_matches(given: str | None, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys``, in time that does not depend on where they differ."""
    if not given:
        return False
    found = False
    for key in keys:  # no early exit: every key is compared
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def retry_after_header(retry_after_s: float) -> str:
    """A Retry-After value: whole seconds, at least one."""
    return str(max(1, math.ceil(retry_after_s)))


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"error", "field"}`` of the first pydantic error of a request."""
    if not errors:
        return {"error": "invalid request", "field": None}
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "header", "path", "cookie"):
        where, loc = loc[0], loc[1:]
    else:
        where = "body"
    if err.get("type") == "json_invalid":
        loc = []  # the location is a character offset, not a field
    field = ".".join(loc) or where
    return {"error": f"{field}: {err.get('msg', 'invalid')}", "field": field}


def agent_infos(client: FleetClient) -> list[AgentInfo]:
    """What ``GET /v1/agents`` lists."""
    return [
        AgentInfo(
            name=name,
            description=agent.description,
            steps=[AgentStepInfo(name=s.name, kind=s.kind, loop=loop.name if loop else None)
                   for s, loop in agent.iter_steps()],
            input_schema=agent.json_schema(),
            example=agent.example,
        )
        for name, agent in sorted(client.agents.items())
    ]


# --- middleware ------------------------------------------------------------------------
class LoopbackOnly:
    """Answers 403 to every client that is not on loopback (a gateway without API keys)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            if client is not None and not is_loopback(client[0]):
                log.warning("refused %s %s from %s: no API keys are set, loopback only",
                            scope.get("method"), scope.get("path"), client[0])
                response = JSONResponse(
                    {"error": "this gateway has no API keys and serves loopback clients only"}, 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """A request body went over the gateway's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the {limit}-byte limit (FLEET_GATEWAY_MAX_BODY_BYTES)")


class BodyLimit:
    """Answers 413 to a body over ``limit`` bytes: by its Content-Length before reading a
    byte, and by the bytes actually received for a body sent without one (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _error_response(BodyTooLarge(self.limit))(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException: FastAPI passes it on from the body reader as it is.
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            await _error_response(exc)(scope, receive, send)


def _error_response(exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


# --- the app ---------------------------------------------------------------------------
@dataclass
class _Services:
    client: FleetClient
    admission: Admission
    aio: AsyncFleetClient
    triton: TritonClient


def _services(request: Request) -> _Services:
    return request.app.state.services


Services = Annotated[_Services, Depends(_services)]
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key of FLEET_API_KEYS.")


def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    x_api_key: Annotated[str | None, Security(_api_key)],
) -> None:
    """Every /v1 call carries one of the API keys (when the gateway has any)."""
    keys: list[str] = request.app.state.api_keys
    if not keys:
        return  # loopback only, enforced by LoopbackOnly
    given = credentials.credentials if credentials is not None else x_api_key
    if not key_matches(given, keys):
        raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})


async def known_run(run_id: str, services: Services) -> str:
    """The path's run id, once its run is known to exist."""
    # Checked before an event stream starts: once it has, the status can no longer be 404.
    if not await services.aio.exists(run_id):
        raise RunNotFound(f"no run '{run_id}'")
    return run_id


def create_gateway(settings: Settings) -> FastAPI:
    """The gateway's ASGI app for one fleet.

    Connections (Redis, the broker, Triton) are opened when the app starts and closed
    when it stops.
    """
    keys = settings.api_key_list()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = FleetClient(settings)
        services = _Services(
            client=client,
            admission=Admission(settings, client.app, client.agents, client.store),
            aio=AsyncFleetClient(settings, sync=client),
            triton=TritonClient(settings.triton_grpc_url),
        )
        app.state.services = services
        log.info("gateway up: %d agents, %s", len(client.agents),
                 f"{len(keys)} API keys" if keys else "no API keys (loopback only)")
        try:
            yield
        finally:
            await services.aio.close()
            services.triton.close()
            client.close()

    app = FastAPI(
        title="fleet gateway",
        summary="Submit agent runs to the fleet and follow them.",
        version="1",
        lifespan=lifespan,
    )
    app.state.api_keys = keys
    app.add_middleware(BodyLimit, limit=settings.gateway_max_body_bytes)
    if not keys:
        # Added last, so it runs first: a client that may not call is refused before its
        # body is read.
        app.add_middleware(LoopbackOnly)
    v1 = dict(dependencies=[Depends(require_key)], tags=["runs"])

    @app.post("/v1/runs", status_code=201, response_model=SubmitResponse, **v1,
              responses={200: {"model": SubmitResponse, "description": "The run of a repeated idempotency key."},
                         **_ERRORS,
                         429: {"model": ErrorBody, "description": "Shed: retry after the Retry-After header."}})
    def submit_run(sub: Submission, response: Response, services: Services) -> SubmitResponse:
        """Submit a run of an agent."""
        run_id, created = services.admission.submit(sub)
        if not created:
            response.status_code = 200
        try:
            status = services.client.get(run_id).status
        except RunNotFound:  # the key outlived the finished run's record
            status = None
        log.info("run %s: submitted over HTTP (%s)", run_id,
                 "created" if created else "existing run of its idempotency key")
        return SubmitResponse(run_id=run_id, status=status, created=created)

    @app.get("/v1/runs/{run_id}", response_model=RunView, **v1, responses={**_ERRORS, **_NOT_FOUND})
    def get_run(run_id: str, services: Services) -> dict[str, Any]:
        """A run: status, per-step timing and tokens, result or error."""
        run = services.client.get(run_id)
        return {**run.model_dump(), "latency_s": run.latency_s,
                "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}

    @app.get("/v1/runs/{run_id}/events", response_class=EventSourceResponse, **v1,
             responses=_as_json({**_ERRORS, **_NOT_FOUND}))
    async def run_events(
        run_id: Annotated[str, Depends(known_run)],
        services: Services,
        last_event_id: Annotated[str | None, Header(
            pattern=_STREAM_ID, description="Resume after this event id (sent back by EventSource).")] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """The run's events as server-sent events, until the run ends.

        Each event is `event: <type>` (status, step, token), `id: <stream id>` and
        `data: <JSON of the event's fields>`. The stream ends after the run's terminal status.
        """
        log.debug("run %s: event stream opened after %s", run_id, last_event_id or "the start")
        async for event_id, fields in services.aio.entries(run_id, after=last_event_id or "0"):
            yield ServerSentEvent(id=event_id, event=fields.get("type", "message"), data=fields)
        log.debug("run %s: event stream ended", run_id)

    @app.delete("/v1/runs/{run_id}", response_model=CancelResponse, **v1, responses={**_ERRORS, **_NOT_FOUND})
    def cancel_run(run_id: str, services: Services) -> CancelResponse:
        """Cancel a run: its remaining steps are skipped and an in-flight model call is cancelled."""
        cancelled = services.client.cancel(run_id)
        status = services.client.get(run_id).status
        log.info("run %s: cancel over HTTP (%s)", run_id, "cancelled" if cancelled else f"already {status}")
        return CancelResponse(run_id=run_id, cancelled=cancelled, status=status)

    @app.get("/v1/agents", response_model=AgentList, **{**v1, "tags": ["agents"]}, responses=_ERRORS)
    def list_agents(services: Services) -> AgentList:
        """Agents with their steps, input schema and an example input."""
        return AgentList(agents=agent_infos(services.client))

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
        model_up = services.triton.model_ready(settings.triton_model)
        body = Readiness(ready=redis_up and model_up, redis=redis_up, triton_model=model_up,
                         model=settings.triton_model)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    registry = _gateway_registry(settings)

    @app.middleware("http")
    async def _count(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        """Prometheus metrics: the gateway's requests and the fleet-wide queue gauges.

        Open like Flower's and the workers' /metrics (it holds no run data): keep the
        port on the monitoring network, as the compose and Kubernetes stacks do.
        """
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app)
    return app


REQUESTS = Counter("fleet_gateway_requests", "Gateway HTTP requests.", ["method", "route", "status"],
                   registry=None)
LATENCY = Histogram("fleet_gateway_request_seconds", "Gateway request latency (to the response start).",
                    ["method", "route"], registry=None)


def _gateway_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(REQUESTS)
    registry.register(LATENCY)
    registry.register(FleetCollector(settings))
    return registry


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(list(exc.errors())), 422)

    @app.exception_handler(InvalidSubmission)
    async def _invalid_submission(request: Request, exc: InvalidSubmission) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": exc.field}, 422)

    @app.exception_handler(RunNotFound)
    async def _not_found(request: Request, exc: RunNotFound) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 404)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"error": str(exc), "retry_after_s": exc.retry_after_s}, 429,
                            headers={"Retry-After": retry_after_header(exc.retry_after_s)})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        # Nothing was admitted without Redis: the client may simply try again.
        log.warning("%s %s: Redis unreachable: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": "the fleet's Redis is unreachable; retry shortly"}, 503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error"}, 500)


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to listen beyond loopback without API keys.

    Raises:
        InsecureBind: ``host`` is not loopback and ``FLEET_API_KEYS`` is empty.
    """
    if not settings.api_key_list() and not is_loopback(host):
        raise InsecureBind(
            f"refusing to listen on {host} without API keys: set FLEET_API_KEYS "
            "(comma-separated) or listen on 127.0.0.1"
        )


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
    log.info("gateway listening on http://%s:%d", host, port)
    uvicorn.run(create_gateway(settings), host=host, port=port,
                log_level=settings.log_level.lower(), server_header=False)

