"""The run console's routes: its pages, its login, its static files (see
:mod:`fleet.surfaces.gateway.console`).

None is in the OpenAPI document: they answer HTML for browsers, not JSON for programs.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from itertools import islice
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fleet.errors import InvalidSubmission, RunNotFound
from fleet.run.records import TERMINAL
from fleet.surfaces.client import FleetClient
from fleet.surfaces.gateway.auth import KEY_COOKIE, cookie_key, csrf_token, is_loopback
from fleet.surfaces.gateway.console import pages
from fleet.surfaces.gateway.console.pages import Viewer
from fleet.surfaces.gateway.deps import FleetServices, Services
from fleet.tenants import OPERATOR, Caller

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

_STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_MAX_EVENTS = 2000
# Scripts and styles of the gateway only (the waterfall's bars are placed by style attributes).
_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
_FILTERS = ("status", "agent", "priority", "tenant", "since", "error", "cursor")


class LoginNeeded(Exception):
    """A page was asked for without a valid key: the browser goes to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def _viewer(request: Request) -> tuple[Caller, Viewer]:
    """Who asks for a page: the caller its cookie's key (or a header's) names."""
    tenants = request.app.state.tenants
    if not tenants.has_keys:
        return OPERATOR, Viewer(OPERATOR.tenant, True, "", keyed=False)
    key = cookie_key(request) or request.headers.get("x-api-key")
    caller = tenants.caller(key) if key else None
    if caller is None:
        raise LoginNeeded(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return caller, Viewer(caller.tenant, caller.admin, csrf_token(key), keyed=True)


Who = Annotated[tuple[Caller, Viewer], Depends(_viewer)]


def _client(services: FleetServices, caller: Caller) -> FleetClient:
    return services.client.scoped(caller)


def _html(text: str, status: int = 200) -> HTMLResponse:
    # No page is framed by another site, and none is kept by a shared cache.
    return HTMLResponse(text, status, headers={"X-Frame-Options": "DENY", "Cache-Control": "no-store",
                                               "Content-Security-Policy": _CSP, "Referrer-Policy": "same-origin"})


# --- login ---------------------------------------------------------------------------------

def _safe_next(next_url: str) -> str:
    """Only a console path: a login never sends the browser to another site."""
    return next_url if next_url.startswith("/console/") and not next_url.startswith("//") else "/console/runs"


@router.get("/login")
def login_form(next: str = "/console/runs") -> HTMLResponse:  # noqa: A002 - the query's name
    return _html(pages.login_page(next_url=_safe_next(next)))


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the key and keep it in the browser's cookie: HttpOnly (no script reads it),
    SameSite=Strict (no other site's page sends it), Secure unless the browser is on loopback."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    key, next_url = (form.get("key") or [""])[0], _safe_next((form.get("next") or [""])[0])
    caller = request.app.state.tenants.caller(key) if key else None
    if caller is None:
        log.warning("console: a login with a wrong key from %s", request.client.host if request.client else "?")
        return _html(pages.login_page("That key is not one of the fleet's API keys.", next_url), 401)
    response = RedirectResponse(next_url, 303)
    secure = request.url.scheme == "https" or not is_loopback(request.client.host if request.client else None)
    response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict", secure=secure, path="/")
    log.info("console: %s logged in%s", caller.tenant, " (operator)" if caller.admin else "")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/console/login", 303)
    response.delete_cookie(KEY_COOKIE, path="/")
    return response


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in _STATIC:
        return Response("not found", 404)
    text = resources.files("fleet.surfaces.gateway.console").joinpath("static", name).read_text()
    return Response(text, media_type=_STATIC[name], headers={"Cache-Control": "max-age=300"})


# --- pages ---------------------------------------------------------------------------------

@router.get("")
@router.get("/")
def home() -> Response:
    return RedirectResponse("/console/runs", 303)


def _query(request: Request) -> dict[str, Any]:
    params = request.query_params
    q: dict[str, Any] = {name: params.get(name) or None for name in _FILTERS}
    q["status"] = [s for s in params.getlist("status") if s] or None
    return q


def _listing(client: FleetClient, q: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    since = q.get("since")
    page = client.runs(status=q["status"], agent=q["agent"], priority=q["priority"], tenant=q["tenant"],
                       since=time.time() - float(since) if since else None, error=q["error"], limit=50,
                       cursor=q["cursor"])
    return page, client.store.index.short_ids([r.id for r in page.runs])


def _bad_filter(exc: InvalidSubmission, viewer: Viewer) -> HTMLResponse:
    body = f'<p class="error">{pages.esc(exc)}</p><p><a href="/console/runs">All runs</a></p>'
    return _html(pages.layout("Runs", body, viewer, "runs"), 422)


@router.get("/runs")
def runs_page(request: Request, services: Services, who: Who) -> HTMLResponse:
    caller, viewer = who
    client = _client(services, caller)
    q = _query(request)
    try:
        page, short = _listing(client, q)
    except (InvalidSubmission, ValueError) as exc:
        return _bad_filter(exc if isinstance(exc, InvalidSubmission) else InvalidSubmission(str(exc)), viewer)
    tenants = services.settings.tenant_registry.names() if caller.admin else [caller.tenant]
    return _html(pages.runs_page(page, short, q, sorted(client.agents), sorted(tenants), viewer))


@router.get("/runs/rows")
def runs_rows(request: Request, services: Services, who: Who) -> HTMLResponse:
    """The list's rows alone: what the page fetches to keep its statuses live."""
    caller, _ = who
    try:
        page, short = _listing(_client(services, caller), _query(request))
    except (InvalidSubmission, ValueError) as exc:
        return _html(f'<tr><td colspan="8" class="error">{pages.esc(exc)}</td></tr>', 422)
    return _html(pages.run_rows(page, short))


@router.get("/runs/{run_id}")
def run_page(run_id: Annotated[str, Path(max_length=64)], services: Services, who: Who) -> HTMLResponse:
    caller, viewer = who
    client = _client(services, caller)
    try:
        run = client.get(run_id)
    except RunNotFound as exc:
        return _html(pages.layout("No such run", f'<p class="error">{pages.esc(exc)}</p>', viewer, "runs"), 404)
    except InvalidSubmission as exc:
        found = getattr(exc, "candidates", None) or []
        links = "".join(f'<li><a href="/console/runs/{pages.esc(c)}">{pages.esc(c)}</a></li>' for c in found)
        body = f'<p class="error">{pages.esc(exc)}</p>' + (f"<ul>{links}</ul>" if links else "")
        return _html(pages.layout("Which run?", body, viewer, "runs"), 422)
    events = None
    if run.status in TERMINAL:  # an ended run's events end at once: drawn here, not streamed
        events = [fields for _, fields in islice(client.entries(run.id, timeout=2.0), _MAX_EVENTS)]
    return _html(pages.run_page(run, viewer, services.settings.trace_url_template, events))


@router.get("/dead-letters")
def dead_letters_page(services: Services, who: Who) -> HTMLResponse:
    caller, viewer = who
    return _html(pages.dead_letters_page(_client(services, caller).dlq_list(limit=200), viewer))


@router.get("/tenants")
def tenants_page(services: Services, who: Who) -> HTMLResponse:
    caller, viewer = who
    client = _client(services, caller)
    return _html(pages.tenants_page(client.tenants(), client.usage("tenant", 86400.0), viewer))


def login_redirect(request: Request, exc: LoginNeeded) -> Response:
    """Where a page asked for without a key sends the browser."""
    return RedirectResponse(f"/console/login?next={quote(exc.next_url, safe='')}", 303)
