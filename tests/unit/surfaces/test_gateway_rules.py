"""Rules of the HTTP gateway that need no fleet: who may call it, errors, its schema."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fleet.settings import Settings
from fleet.surfaces.gateway import (
    InsecureBind,
    check_bind,
    create_gateway,
    is_loopback,
    retry_after_header,
    serve,
    validation_error_body,
)


def _settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)


def _get(app, path: str, client_host: str) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.get(path)
    return asyncio.run(call())


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("example.com", False), ("", False), (None, False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_without_keys_only_loopback_clients_are_served():
    app = create_gateway(_settings(api_keys=""))
    assert _get(app, "/healthz", "127.0.0.1").status_code == 200
    refused = _get(app, "/healthz", "203.0.113.7")
    assert refused.status_code == 403 and "loopback" in refused.json()["error"]
    assert _get(app, "/v1/agents", "10.1.2.3").status_code == 403


def test_with_keys_remote_clients_reach_the_key_check():
    app = create_gateway(_settings(api_keys="k1"))
    assert _get(app, "/healthz", "203.0.113.7").status_code == 200
    denied = _get(app, "/v1/agents", "203.0.113.7")
    assert denied.status_code == 401 and "API key" in denied.json()["error"]
    assert denied.headers["www-authenticate"] == "Bearer"


def test_serve_refuses_to_listen_beyond_loopback_without_keys():
    with pytest.raises(InsecureBind, match="FLEET_API_KEYS"):
        serve(_settings(api_keys=""), host="0.0.0.0", port=1)
    with pytest.raises(InsecureBind):
        check_bind(_settings(api_keys=" , "), "10.0.0.1")  # blanks are no keys
    check_bind(_settings(api_keys=""), "127.0.0.1")
    check_bind(_settings(api_keys="k1"), "0.0.0.0")


def test_tenant_and_admin_keys_count_as_keys():
    check_bind(_settings(admin_keys="ops"), "0.0.0.0")
    check_bind(_settings(tenants='[{"name": "acme", "keys": ["acme-key"]}]'), "0.0.0.0")
    app = create_gateway(_settings(tenants='[{"name": "acme", "keys": ["acme-key"]}]'))
    assert _get(app, "/v1/agents", "203.0.113.7").status_code == 401


@pytest.mark.parametrize("seconds, header", [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (30, "30")])
def test_retry_after_is_whole_seconds(seconds, header):
    assert retry_after_header(seconds) == header


def test_validation_errors_name_the_field():
    body = validation_error_body([{"loc": ("body", "input", "question"), "msg": "too long", "type": "x"}])
    assert body == {"error": "input.question: too long", "field": "input.question"}
    assert validation_error_body([{"loc": ("body", 7), "msg": "JSON decode error", "type": "json_invalid"}])["field"] == "body"
    assert validation_error_body([{"loc": ("header", "last-event-id"), "msg": "bad", "type": "x"}])["field"] == "last-event-id"
    assert validation_error_body([{"loc": ("body",), "msg": "Field required", "type": "missing"}])["field"] == "body"


def test_openapi_schema_documents_models_errors_and_keys():
    schema = create_gateway(_settings(api_keys="k1")).openapi()
    paths = schema["paths"]
    assert set(paths) >= {"/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events", "/v1/agents",
                          "/healthz", "/readyz"}
    post = paths["/v1/runs"]["post"]
    assert post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/SubmitResponse")
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "429" in post["responses"]
    assert "text/event-stream" in paths["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    run_view = schema["components"]["schemas"]["RunView"]["properties"]
    assert {"id", "status", "result", "steps", "latency_s", "tokens_in", "tokens_out"} <= set(run_view)
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])


def test_with_keys_every_route_but_health_needs_one():
    app = create_gateway(_settings(api_keys="k1"))
    for path in ("/metrics", "/openapi.json", "/v1/agents", "/v1/runs/" + "a" * 32):
        answer = _get(app, path, "127.0.0.1")
        assert answer.status_code == 401, (path, answer.status_code)
    assert _get(app, "/docs", "127.0.0.1").status_code == 404  # no browsable docs that would need no key
    assert _get(app, "/healthz", "127.0.0.1").status_code == 200

    async def keyed(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers={"Authorization": "Bearer k1"}) as client:
            return await client.get(path)

    schema = asyncio.run(keyed("/openapi.json"))
    assert schema.status_code == 200 and "/v1/runs" in schema.json()["paths"]


def test_without_keys_docs_and_schema_stay_open_on_loopback():
    app = create_gateway(_settings(api_keys=""))
    assert _get(app, "/openapi.json", "127.0.0.1").status_code == 200
    assert _get(app, "/docs", "127.0.0.1").status_code == 200


@pytest.mark.parametrize("run_id", ["fleet:deadletter", "A" * 32, "a" * 5, "a" * 33, "x" * 33, "abcdefg", "..%2e%2e"])
def test_a_run_id_that_is_not_one_is_refused_naming_the_field(run_id):
    app = create_gateway(_settings(api_keys=""))
    app.state.services = None  # no fleet behind it: a refused id never reaches one
    for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events"):
        answer = _get(app, path, "127.0.0.1")
        assert answer.status_code == 422, (path, answer.status_code)
        assert answer.json()["field"] == "run_id"
