"""The run console: the gateway's pages for people in a browser.

::

    /console/runs               runs, filtered like `fleet runs list`, their statuses live
    /console/runs/{id}          one run (a short id will do): its waterfall, its events live,
                                its trace, cancel (operators)
    /console/dead-letters       dead-lettered steps, replay (operators)
    /console/tenants            tenants: runs against quotas, backlog, model time, usage
    /console/login, /logout     the browser's API key in an HttpOnly, SameSite=Strict cookie

Pages are rendered on the server (:mod:`~fleet.surfaces.gateway.console.pages`, Python string
templates, every value escaped) from the same clients and views the API answers with; a little
JavaScript (``static/console.js``, no build step) refreshes the list, streams a run's events
from ``GET /v1/runs/{id}/events`` and sends the operators' actions to the API with the page's
CSRF token (:mod:`fleet.surfaces.gateway.auth`). Tenants see their own runs, read-only;
operators see every tenant and may cancel and replay. Without API keys (loopback only) no
login is asked for.
"""

from fleet.surfaces.gateway.console.routes import router

__all__ = ["router"]
