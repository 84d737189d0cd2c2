"""Who may call the gateway, and as which tenant.

With API keys (a tenant's in ``FLEET_TENANTS``, the default tenant's ``FLEET_API_KEYS``, the
operators' ``FLEET_ADMIN_KEYS``) every route but the health probes needs ``Authorization:
Bearer <key>`` or ``X-API-Key: <key>``: the ``/v1`` API, ``/metrics`` and the OpenAPI
schema alike; the key names the caller (:class:`fleet.tenants.Caller`). Without keys the
gateway is for this machine only: :func:`check_bind` refuses to listen beyond loopback,
:class:`LoopbackOnly` answers 403 to any client that is not on loopback, and a caller is
the operator of the one default tenant.

A browser on the run console (:mod:`fleet.surfaces.gateway.console`) carries its key in a cookie
(:data:`KEY_COOKIE`: HttpOnly, so the page's scripts never read it; SameSite=Strict, so no
other site's page sends it). A request that changes something and is authenticated by that
cookie must also carry the page's :func:`csrf_token` in ``X-CSRF-Token``, which only a page
the gateway served holds; a request with the key in a header needs none.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from typing import Annotated

from fastapi import Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fleet.settings import Settings
from fleet.tenants import OPERATOR, Caller, Tenants

log = logging.getLogger(__name__)


class InsecureBind(ValueError):
    """The gateway was asked to listen beyond loopback without API keys."""


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


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to listen beyond loopback without API keys.

    Raises:
        InsecureBind: ``host`` is not loopback and ``FLEET_API_KEYS`` is empty.
    """
    if not settings.tenant_registry.has_keys and not is_loopback(host):
        raise InsecureBind(
            f"refusing to listen on {host} without API keys: set FLEET_API_KEYS (comma-separated), "
            "tenants' keys (FLEET_TENANTS) or FLEET_ADMIN_KEYS, or listen on 127.0.0.1"
        )


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key of FLEET_API_KEYS.")


#: The cookie a console's browser keeps its API key in.
KEY_COOKIE = "fleet_key"
#: The header a console's page sends its CSRF token in.
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token(key: str) -> str:
    """The token a console page holds for the key its browser logged in with: derived from the
    key (so every replica of the gateway agrees), telling nothing of it."""
    return hmac.new(key.encode(), b"fleet console page", hashlib.sha256).hexdigest()[:40]


def cookie_key(request: Request) -> str | None:
    """The key a console's browser sent in its cookie, if any."""
    return request.cookies.get(KEY_COOKIE) or None


def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    x_api_key: Annotated[str | None, Security(_api_key)],
) -> Caller:
    """The caller the call's API key names (any loopback caller when the gateway has none): from
    a header, or from a console's cookie (with the page's CSRF token when the call changes
    something)."""
    tenants: Tenants = request.app.state.tenants
    if not tenants.has_keys:
        return OPERATOR  # loopback only, enforced by LoopbackOnly
    given = credentials.credentials if credentials is not None else x_api_key
    if given is None and (given := cookie_key(request)) is not None and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(given).encode()):
            raise HTTPException(403, f"a request of the console needs its page's {CSRF_HEADER}")
    caller = tenants.caller(given)
    if caller is None:
        raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    return caller


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
