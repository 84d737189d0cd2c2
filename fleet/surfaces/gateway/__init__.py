"""The HTTP gateway: apps that do not speak Python submit and follow runs over HTTP.

::

    POST   /v1/runs                 submit (201 created; 200 for a repeated idempotency key,
                                    409 when it names a different submission)
    GET    /v1/runs                 runs, newest first, filtered and paged by cursor
    GET    /v1/runs/{id}            the run's record, latency and token counts (a short id will do)
    GET    /v1/runs/{id}/events     server-sent events until the run ends (Last-Event-ID resumes)
    DELETE /v1/runs/{id}            cancel
    GET    /v1/sessions/{id}        the turns of one of the tenant's sessions
    GET    /v1/dead-letters         the tenant's dead-lettered steps (?agent=&step=&limit=)
    GET    /v1/dead-letters/{id}    one entry: state, error, traceback, replays
    POST   /v1/dead-letters/{id}/replay   re-run from the failed step ({"patch": ...})
    GET    /v1/tenants              per tenant: runs, backlog, model time share, quota use
    GET    /v1/agents               agents, their steps, input schema and an example
    GET    /metrics                 Prometheus metrics
    GET    /healthz                 the process is up
    GET    /readyz                  Redis answers and the Triton model is ready (503 otherwise)
    GET    /console/...             the run console, pages for browsers (:mod:`~fleet.surfaces.gateway.console`)

One concern a module: :mod:`~fleet.surfaces.gateway.app` (the app and its routes),
:mod:`~fleet.surfaces.gateway.schema` (the OpenAPI document, made to say what the gateway does),
:mod:`~fleet.surfaces.gateway.auth` (API keys and the tenant each names, loopback only without them),
:mod:`~fleet.surfaces.gateway.middleware` (body limit, other sites' writes refused, request metrics) and
:mod:`~fleet.surfaces.gateway.errors` (every failure as JSON ``{"error", "field"}``). The run and
agent views it answers are :mod:`fleet.surfaces.views`, shared with the CLI's ``--json``.
"""

from fleet.surfaces.gateway.app import create_gateway, serve
from fleet.surfaces.gateway.auth import InsecureBind, check_bind, is_loopback
from fleet.surfaces.gateway.errors import retry_after_header, validation_error_body

__all__ = ["InsecureBind", "check_bind", "create_gateway", "is_loopback", "retry_after_header",
           "serve", "validation_error_body"]
