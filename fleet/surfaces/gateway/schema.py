"""The gateway's OpenAPI document, made to say what the gateway does (schemathesis checks it
with all its checks in the suite).

FastAPI's document is built from the routes' models; what those cannot say is added here:

- a submission's body is one variant per agent (its name, and its input as the agent's schema
  has it), so a request the document calls valid is one the gateway takes;
- text in a run's input may not hold NUL (the fleet refuses it, see :mod:`fleet.core.payload`),
  and is bounded by the input size limit;
- without API keys nothing is secured (the gateway serves loopback callers only, keyless);
- links from what a response returns to the operations that take it (a created run's id to
  reading and following it; a batch's id to its status;
  a replay's run to reading it), for stateful testing and for readers;
- a parameter is never null on the wire: an optional one is left out, not sent as null.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from fleet.core.payload import MAX_INT
from fleet.run.agent import AgentDef

#: A string the fleet's payload checks take: no NUL character.
NO_NUL = "^[^\\u0000]*$"

# (path, method) of the operation whose response links on, the status, the link's name, the
# (path, method) it leads to, and each parameter's runtime expression.
_LINKS: tuple[tuple[tuple[str, str], str, str, tuple[str, str], dict[str, str]], ...] = (
    (("/v1/runs", "post"), "201", "GetRun", ("/v1/runs/{run_id}", "get"), {"run_id": "$response.body#/run_id"}),
    (("/v1/runs", "post"), "201", "RunEvents", ("/v1/runs/{run_id}/events", "get"),
     {"run_id": "$response.body#/run_id"}),
    (("/v1/runs", "post"), "200", "GetRun", ("/v1/runs/{run_id}", "get"), {"run_id": "$response.body#/run_id"}),
    (("/v1/batches", "post"), "201", "GetBatch", ("/v1/batches/{batch_id}", "get"),
     {"batch_id": "$response.body#/batch_id"}),
    (("/v1/dead-letters/{entry_id}/replay", "post"), "200", "GetReplayedRun", ("/v1/runs/{run_id}", "get"),
     {"run_id": "$response.body#/run_id"}),
)


def install(app: FastAPI, agents: Callable[[], dict[str, AgentDef]], secured: bool, max_input_bytes: int) -> None:
    """Make ``app.openapi()`` build (once) the document described above; ``agents`` gives the
    agents the gateway runs when it is first asked."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _agent_bodies(doc, agents(), max_input_bytes)
            _links(doc)
            _no_null_parameters(doc)
            if not secured:
                _unsecured(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _text_rules(schema: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """An agent's input schema with what the payload checks add: no NUL in text, text and
    integers bounded."""
    out = copy.deepcopy(schema)
    for prop in out.get("properties", {}).values():
        if prop.get("type") == "string":
            prop["pattern"] = NO_NUL
            prop["maxLength"] = min(prop.get("maxLength", max_chars), max_chars)
        elif prop.get("type") == "integer":
            prop.setdefault("minimum", -MAX_INT)
            prop.setdefault("maximum", MAX_INT)
        elif prop.get("type") == "number":
            prop.setdefault("minimum", -1e300)
            prop.setdefault("maximum", 1e300)
    return out


def _agent_bodies(doc: dict[str, Any], agents: dict[str, AgentDef], max_input_bytes: int) -> None:
    """POST /v1/runs takes one of the agents' submissions: ``agent`` names it, ``input`` is its input."""
    schemas = doc["components"]["schemas"]
    base = schemas["Submission"]
    variants = []
    for name, agent in sorted(agents.items()):
        texts = sum(1 for p in agent.json_schema().get("properties", {}).values() if p.get("type") == "string")
        # The limit counts the input's JSON with non-ASCII escaped: at most 12 bytes a character
        # (a surrogate pair), so text this long always fits.
        max_chars = max(1, (max_input_bytes - 256) // (12 * max(1, texts)))
        variant = copy.deepcopy(base)
        variant["title"] = f"Submission of {name}"
        variant["properties"]["agent"] = {"type": "string", "enum": [name], "description": base["properties"][
            "agent"]["description"]}
        variant["properties"]["input"] = {**_text_rules(agent.json_schema(), max_chars),
                                          "description": base["properties"]["input"]["description"]}
        if agent.json_schema().get("required"):
            variant["required"] = sorted({*variant.get("required", []), "input"})
        key = f"Submission_{name}"
        schemas[key] = variant
        variants.append({"$ref": f"#/components/schemas/{key}"})
    body = doc["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {"oneOf": variants, "discriminator": {"propertyName": "agent", "mapping": {
        name: f"#/components/schemas/Submission_{name}" for name in sorted(agents)}}}


def _links(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    for (path, method), status, name, (to_path, to_method), parameters in _LINKS:
        response = paths[path][method]["responses"].get(status)
        if response is None:
            continue
        response.setdefault("links", {})[name] = {
            "operationId": paths[to_path][to_method]["operationId"], "parameters": parameters}


def _unsecured(doc: dict[str, Any]) -> None:
    """Without API keys no route asks for one: loopback callers are served keyless."""
    doc.get("components", {}).pop("securitySchemes", None)
    for operations in doc["paths"].values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)


def _no_null_parameters(doc: dict[str, Any]) -> None:
    """``anyOf [X, null]`` of an optional parameter becomes ``X``: a query string or a header
    cannot carry a JSON null (a client leaves the parameter out)."""
    for operations in doc["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                options = schema.get("anyOf")
                if options and any(o.get("type") == "null" for o in options):
                    kept = [o for o in options if o.get("type") != "null"]
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    parameter["schema"] = {**rest, **kept[0]} if len(kept) == 1 else {**rest, "anyOf": kept}
