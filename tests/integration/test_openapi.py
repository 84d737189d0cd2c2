"""The gateway's OpenAPI document tells the truth: schemathesis, with every one of its checks
(status codes, content types, headers and bodies as documented, schema-valid requests taken and
invalid ones refused, Allow headers, authentication enforced where declared, resources there
after creation), against a real fleet whose gateway has API keys, including stateful sequences
that follow the document's links (a created run's id into reading and following it)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.surfaces.gateway import create_gateway

from .conftest import close_fleet, new_fleet, served_gateway

pytestmark = pytest.mark.integration

TENANTS = json.dumps([{"name": "acme", "keys": ["acme-openapi-key"]}])
ADMIN = "ops-openapi-key"


@pytest.fixture(scope="module")
def keyed(redis_url, triton, session_dir) -> Iterator[tuple[str, object]]:
    """A fleet with the built-in agents only, workers, and its gateway with API keys; the URL."""
    f = new_fleet(redis_url, triton, session_dir, "o", test_agents=False, tenants=TENANTS, admin_keys=ADMIN)
    try:
        f.start_worker("inference", "llm", "threads", 8)
        f.start_worker("tools", "tool", "threads", 4)
        with served_gateway(f.settings) as url:
            yield url, f
    finally:
        close_fleet(f)


def test_schemathesis_finds_nothing_with_all_its_checks(keyed, tmp_path: Path):
    url, _ = keyed
    report = tmp_path / "events.ndjson"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
         "--header", f"Authorization: Bearer {ADMIN}", "--checks", "all", "--max-examples", "5", "--seed", "7",
         "--workers", "1", "--request-timeout", "30", "--warnings", "off", "--no-color",
         "--report", "ndjson", "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the tree
    events = [json.loads(line) for line in report.read_text().splitlines()]
    phases = {e["PhaseFinished"]["phase"]["name"]: e["PhaseFinished"]["status"] for e in events
              if "PhaseFinished" in e}
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every phase ran and found nothing; stateful sequences ran (links were followed).
    assert {"coverage", "fuzzing", "stateful"} <= set(phases), phases
    assert "No issues found" in run.stdout
    stateful = [e for e in events if "ScenarioFinished" in e and e["ScenarioFinished"]["phase"] == "stateful"]
    assert stateful, "no stateful sequence ran"


def test_the_document_declares_security_only_with_keys_and_links_what_it_returns(keyed):
    url, f = keyed
    doc = httpx.get(f"{url}/openapi.json", headers={"X-API-Key": ADMIN}).json()
    post = doc["paths"]["/v1/runs"]["post"]
    assert post["security"] and set(doc["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert set(post["responses"]["201"]["links"]) == {"GetRun", "RunEvents"}
    variants = [ref["$ref"].rsplit("_", 1)[1] for ref in post["requestBody"]["content"]["application/json"]
                ["schema"]["oneOf"]]
    assert variants == ["approval", "calculator", "chat", "fanout", "multicalc", "solver", "triage", "writer"]
    calculator = doc["components"]["schemas"]["Submission_calculator"]["properties"]["input"]
    assert calculator["required"] == ["question"] and calculator["properties"]["question"]["pattern"]
    assert httpx.get(f"{url}/openapi.json").status_code == 401  # the document needs a key too
    # Without keys (loopback only) nothing is declared secured: a keyless call is served.
    open_settings = f.settings.model_copy(update={"tenants": [], "admin_keys": "", "api_keys": ""})
    open_doc = create_gateway(open_settings).openapi()
    assert "securitySchemes" not in open_doc.get("components", {})
    assert all("security" not in op and "401" not in op["responses"]
               for ops in open_doc["paths"].values() for op in ops.values())


def test_method_and_body_errors_are_as_documented(keyed):
    url, _ = keyed
    with httpx.Client(base_url=url, headers={"X-API-Key": ADMIN}) as http:
        put = http.put("/v1/runs/" + "0" * 32)
        assert put.status_code == 405 and put.headers["allow"] == "DELETE, GET"
        garbled = http.post("/v1/dead-letters/1-0/replay", content=b"\xff\xfe\x0f",
                            headers={"content-type": "application/json"})
        assert garbled.status_code == 422 and garbled.json()["field"] == "body"
        both = http.post("/v1/batches", json={"agent": "writer", "inputs": [], "items": []})
        assert both.status_code == 422 and "either inputs or items" in both.json()["error"]
        not_a_bool = http.post("/v1/runs", json={"agent": "calculator", "input": {"question": "1 + 1"},
                                                 "stream": 0})
        assert not_a_bool.status_code == 422 and not_a_bool.json()["field"] == "stream"
