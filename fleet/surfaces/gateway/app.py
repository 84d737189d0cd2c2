"""The gateway's app: its connections, middleware and routers (see :mod:`fleet.surfaces.gateway`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from fleet.core import tracing
from fleet.inference.triton import TritonClient
from fleet.run.agent import load_agents
from fleet.scheduling.admission import Admission
from fleet.settings import Settings
from fleet.surfaces.aio import AsyncFleetClient
from fleet.surfaces.client import FleetClient
from fleet.surfaces.gateway import console
from fleet.surfaces.gateway.auth import LoopbackOnly, check_bind, require_key
from fleet.surfaces.gateway.console.routes import LoginNeeded, login_redirect
from fleet.surfaces.gateway.deps import FleetServices
from fleet.surfaces.gateway.errors import install_error_handlers
from fleet.surfaces.gateway.middleware import BodyLimit, SameOrigin, count_requests
from fleet.surfaces.gateway.routes import ROUTERS
from fleet.surfaces.gateway.schema import install as install_schema

log = logging.getLogger(__name__)


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
        services = FleetServices(
            client=client,
            admission=Admission(settings, client.app, client.agents, client.store),
            aio=AsyncFleetClient(settings, sync=client),
            triton=[TritonClient(r.grpc_url) for r in settings.replicas()],
            settings=settings,
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
    app.add_middleware(SameOrigin)
    if not keys:
        app.add_middleware(LoopbackOnly)
    registry = app.state.metrics = count_requests(app, settings)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(console.router)
    app.add_exception_handler(LoginNeeded, login_redirect)  # type: ignore[arg-type]
    keyed = [Depends(require_key)]

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

    def agents() -> dict:
        services = getattr(app.state, "services", None)
        return services.client.agents if services is not None else load_agents(settings.agents_dir)

    install_schema(app, agents, secured=keys, max_input_bytes=settings.max_input_bytes)
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
