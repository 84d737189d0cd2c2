"""ASGI middleware of the gateway: the body size limit, refusing other sites' writes, and the
request metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.ops.gauges import FleetCollector
from fleet.settings import Settings

REQUESTS = Counter("fleet_gateway_requests", "Gateway HTTP requests.", ["method", "route", "status"],
                   registry=None)
LATENCY = Histogram("fleet_gateway_request_seconds", "Gateway request latency (to the response start).",
                    ["method", "route"], registry=None)


def error_response(exc: HTTPException) -> JSONResponse:
    """An HTTP error as the gateway answers every error: ``{"error": ...}``."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


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
            await error_response(BodyTooLarge(self.limit))(scope, receive, send)
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
            await error_response(exc)(scope, receive, send)


class SameOrigin:
    """Answers 403 to a browser's request that would change something when another site's page
    sent it (``Sec-Fetch-Site``, else an ``Origin`` that is not the gateway's). A gateway without
    keys (loopback only) would otherwise take a replay from any page its operator opens; clients
    that are not browsers send neither header and are not concerned."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
            site = headers.get("sec-fetch-site")
            origin = headers.get("origin")
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
            if site in ("cross-site", "same-site") or (site is None and origin is not None and origin != own):
                response = JSONResponse({"error": "refused: a request from another site's page"}, 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def count_requests(app: FastAPI, settings: Settings) -> CollectorRegistry:
    """Count the app's requests by route and status; the registry its ``/metrics`` serves
    (with the fleet-wide queue gauges)."""
    registry = CollectorRegistry()
    registry.register(REQUESTS)
    registry.register(LATENCY)
    registry.register(FleetCollector(settings))

    @app.middleware("http")
    async def _count(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    return registry
