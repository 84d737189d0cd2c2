"""How failures become HTTP answers: every error is JSON ``{"error", "field"}`` (with
``retry_after_s`` and a Retry-After header where waiting helps)."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import Scope

from fleet.errors import AmbiguousRunId, IdempotencyConflict, InvalidSubmission, Overloaded, QuotaExceeded, RunNotFound
from fleet.surfaces.gateway.middleware import error_response

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error the gateway answers."""

    error: str = Field(description="What is wrong, naming the field when one is to blame.")
    field: str | None = Field(None, description="Dotted path of the offending field, e.g. input.question.")
    retry_after_s: float | None = Field(None, description="With 429: when a retry has a fair chance.")
    quota: str | None = Field(None, description="With 429: the tenant's quota that refused the call, if one did.")
    candidates: list[str] | None = Field(None, description="With 422 for a short run id that starts several "
                                                            "runs' ids: those runs' ids.")


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    403: {"model": ErrorBody, "description": "Without API keys, only loopback clients are served."},
    413: {"model": ErrorBody, "description": "Request body over FLEET_GATEWAY_MAX_BODY_BYTES."},
    422: {"model": ErrorBody, "description": "Invalid request; `field` names what is wrong (a short run id that "
          "starts several runs' ids lists them in `candidates`)."},
    503: {"model": ErrorBody, "description": "The fleet's Redis is unreachable; retry after Retry-After."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such run (or not the caller's tenant's)."}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The idempotency key names a run of a different submission."}}


def as_json(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Error responses of a route whose own media type is not JSON (FastAPI would document
    them under the route's media type)."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {code: {"description": r["description"], "content": {"application/json": {"schema": ref}}}
            for code, r in responses.items()}


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


def _leaf_routes(routes: list[Any]) -> list[Any]:
    """Routes with a path, from routers included whole as well (their paths carry their prefix)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _leaf_routes(inner.routes) if inner is not None else [route]
    return out


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods of every route whose path matches the request's (a route whose path matches
    but whose method does not answers a partial match)."""
    methods: set[str] = set()
    for route in _leaf_routes(list(app.router.routes)):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure a route can raise onto its status and JSON body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(list(exc.errors())), 422)

    @app.exception_handler(InvalidSubmission)
    async def _invalid_submission(request: Request, exc: InvalidSubmission) -> JSONResponse:
        body: dict[str, Any] = {"error": str(exc), "field": exc.field}
        if isinstance(exc, AmbiguousRunId):
            body["candidates"] = exc.candidates
        return JSONResponse(body, 422)

    @app.exception_handler(RunNotFound)
    async def _not_found(request: Request, exc: RunNotFound) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 404)

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": "idempotency_key"}, 409)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        body: dict[str, Any] = {"error": str(exc), "retry_after_s": exc.retry_after_s}
        if isinstance(exc, QuotaExceeded):
            body["quota"] = exc.quota
        return JSONResponse(body, 429, headers={"Retry-After": retry_after_header(exc.retry_after_s)})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not decode: invalid JSON, like any other.
            return JSONResponse({"error": f"body: could not be read as JSON ({exc.detail})", "field": "body"}, 422)
        if exc.status_code == 405:
            # Every method the path takes, not only those of the first route that matched it.
            allowed = ", ".join(allowed_methods(app, request.scope))
            return JSONResponse({"error": f"{request.method} is not allowed here (allowed: {allowed})"}, 405,
                                headers={"Allow": allowed})
        return error_response(exc)

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
