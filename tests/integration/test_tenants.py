"""Tenants end to end: what one tenant's key (or client) can reach of another's, idempotency
keys per tenant, each quota refusing with 429 and then admitting again, and the operator's
view; against real Redis, Triton, workers and the gateway over HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from fleet.errors import IdempotencyConflict, QuotaExceeded, RunNotFound
from fleet.ops import launch
from fleet.run.usage import DAY_S
from fleet.scheduling.quotas import QuotaGate
from fleet.surfaces.aio import AsyncFleetClient
from fleet.surfaces.cli import main as cli
from fleet.surfaces.client import FleetClient
from fleet.surfaces.gateway import create_gateway

from .conftest import REPO, close_fleet, new_fleet

pytestmark = pytest.mark.integration

TENANTS = [
    {"name": "acme", "weight": 3, "keys": ["acme-key"]},
    {"name": "globex", "keys": ["globex-key"]},
    {"name": "tight", "keys": ["tight-key"], "quotas": {"max_active_batch": 2, "max_active_interactive": 1}},
    {"name": "rated", "keys": ["rated-key"], "quotas": {"submissions_per_s": 2, "submissions_burst": 2}},
    {"name": "metered", "keys": ["metered-key"], "quotas": {"tokens_per_day": 1}},
]
ADMIN = "ops-key"


@pytest.fixture(scope="module")
def tenant_fleet(redis_url, triton, session_dir, tmp_path_factory):
    agents = tmp_path_factory.mktemp("tenant-agents")
    for toml in (REPO / "tests" / "support" / "agents").glob("*.toml"):
        shutil.copy(toml, agents)
    shutil.copy(REPO / "tests" / "support" / "gated.toml", agents)
    f = new_fleet(redis_url, triton, session_dir, "n", tenants=json.dumps(TENANTS), admin_keys=ADMIN,
                  agents_dir=str(agents))
    try:
        f.start_worker("inference", "llm", "threads", 8)
        f.start_worker("tools", "tool", "threads", 8)
        yield f
    finally:
        close_fleet(f)


@pytest.fixture(scope="module")
def gateway_url(tenant_fleet) -> Iterator[str]:
    port = launch.free_port()
    server = uvicorn.Server(uvicorn.Config(create_gateway(tenant_fleet.settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    launch.wait_until(lambda: server.started, 30, "gateway", interval_s=0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def http(gateway_url) -> Iterator[dict[str, httpx.Client]]:
    """One HTTP client per key: acme, globex, tight, rated, metered, and the operator's."""
    keys = {t["name"]: t["keys"][0] for t in TENANTS} | {"ops": ADMIN}
    clients = {name: httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
               for name, key in keys.items()}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="module")
def as_tenant(tenant_fleet) -> Iterator[dict[str, FleetClient]]:
    clients = {t["name"]: FleetClient(tenant_fleet.settings, tenant=t["name"]) for t in TENANTS}
    yield clients
    for c in clients.values():
        c.close()


def _submit(client: httpx.Client, agent: str, input: dict, **kw) -> httpx.Response:
    return client.post("/v1/runs", json={"agent": agent, "input": input, **kw})


def _not_found_body(resp: httpx.Response, name: str) -> None:
    """A 404 that says only that nothing of that id exists."""
    assert resp.status_code == 404, (resp.status_code, resp.text)
    assert set(resp.json()) == {"error"} and resp.json()["error"] == f"no {name}"


def test_another_tenants_run_is_not_found_on_every_route_and_client_call(tenant_fleet, http, as_tenant):
    made = _submit(http["acme"], "calculator", {"question": "What is 6 * 7?"})
    assert made.status_code == 201, made.text
    run_id = made.json()["run_id"]
    assert tenant_fleet.client.wait(run_id, timeout=60).status == "succeeded"
    unknown = uuid.uuid4().hex

    # Over HTTP: the other tenant gets exactly what it gets for an id that never existed.
    for rid in (run_id, unknown):
        _not_found_body(http["globex"].get(f"/v1/runs/{rid}"), f"run '{rid}'")
        _not_found_body(http["globex"].get(f"/v1/runs/{rid}/events"), f"run '{rid}'")
        _not_found_body(http["globex"].delete(f"/v1/runs/{rid}"), f"run '{rid}'")
        _not_found_body(http["globex"].post(f"/v1/runs/{rid}/signals/approve", json={"ok": True}), f"run '{rid}'")
    # Its owner and the operator see it; the cancel above changed nothing.
    mine = http["acme"].get(f"/v1/runs/{run_id}")
    assert mine.status_code == 200 and mine.json()["tenant"] == "acme" and mine.json()["status"] == "succeeded"
    assert http["ops"].get(f"/v1/runs/{run_id}").json()["result"] == "The answer is 42."

    # The Python clients, sync and asyncio, the same.
    other = as_tenant["globex"]
    for call in (lambda: other.get(run_id), lambda: other.cancel(run_id), lambda: other.wait(run_id, 5),
                 lambda: other.signal(run_id, "approve", {"ok": True}),
                 lambda: list(other.events(run_id, timeout=5))):
        with pytest.raises(RunNotFound, match=f"no run '{run_id}'"):
            call()
    assert as_tenant["acme"].get(run_id).status == "succeeded"

    async def aio_reads() -> list[str]:
        async with AsyncFleetClient(tenant_fleet.settings, sync=other) as aio:
            found = []
            for read in (aio.get(run_id), aio.wait(run_id, 5)):
                try:
                    await read
                except RunNotFound:
                    found.append("404")
            try:
                async for _ in aio.events(run_id, timeout=5):
                    pass
            except RunNotFound:
                found.append("404")
            return found
    assert asyncio.run(aio_reads()) == ["404", "404", "404"]


def test_a_session_belongs_to_its_tenant(tenant_fleet, http, as_tenant):
    session = f"s-{uuid.uuid4().hex[:6]}"
    first = _submit(http["acme"], "chat", {"message": "my name is Ada"}, session_id=session).json()["run_id"]
    assert tenant_fleet.client.wait(first, timeout=60).status == "succeeded"
    turns = http["acme"].get(f"/v1/sessions/{session}")
    assert turns.status_code == 200 and [t["run_id"] for t in turns.json()["turns"]] == [first]
    _not_found_body(http["globex"].get(f"/v1/sessions/{session}"), f"session '{session}'")
    # The same session id under another tenant is another, empty, session.
    theirs = _submit(http["globex"], "chat", {"message": "what is my name?"}, session_id=session).json()["run_id"]
    assert tenant_fleet.client.wait(theirs, timeout=60).status == "succeeded"
    assert http["globex"].get(f"/v1/runs/{theirs}").json()["session"] == []
    assert [t["run_id"] for t in as_tenant["globex"].session(session)] == [theirs]
    assert [t["run_id"] for t in as_tenant["acme"].session(session)] == [first]


def test_another_tenants_dead_letters_are_not_found(tenant_fleet, http, as_tenant):
    run_id = _submit(http["acme"], "doomed", {"value": "x"}).json()["run_id"]
    run = tenant_fleet.client.wait(run_id, timeout=60)
    assert run.status == "dead_lettered"
    entry = run.dead_letter_id
    assert entry in [e["id"] for e in http["acme"].get("/v1/dead-letters").json()["entries"]]
    assert entry in [e["id"] for e in http["ops"].get("/v1/dead-letters").json()["entries"]]
    assert entry not in [e["id"] for e in http["globex"].get("/v1/dead-letters").json()["entries"]]
    _not_found_body(http["globex"].get(f"/v1/dead-letters/{entry}"), f"dead-letter entry '{entry}'")
    _not_found_body(http["globex"].post(f"/v1/dead-letters/{entry}/replay", json={}),
                    f"dead-letter entry '{entry}'")
    other = as_tenant["globex"]
    assert entry not in [e.id for e in other.dlq_list()]
    for call in (lambda: other.dlq_get(entry), lambda: other.dlq_replay(entry)):
        with pytest.raises(RunNotFound):
            call()
    assert other.dlq_replay_all() == [] and other.dlq_purge() == 0
    shown = http["acme"].get(f"/v1/dead-letters/{entry}")
    assert shown.status_code == 200 and shown.json()["entry"]["tenant"] == "acme"
    assert tenant_fleet.client.get(run_id).status == "dead_lettered"  # nothing replayed it


def test_idempotency_keys_are_per_tenant_and_a_different_body_is_a_conflict(tenant_fleet, http, as_tenant):
    key = f"nightly-{uuid.uuid4().hex[:6]}"
    mine = _submit(http["acme"], "calculator", {"question": "2 + 2"}, priority="batch", idempotency_key=key)
    theirs = _submit(http["globex"], "calculator", {"question": "3 + 3"}, priority="batch", idempotency_key=key)
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["run_id"] != theirs.json()["run_id"]
    again = _submit(http["acme"], "calculator", {"question": "2 + 2"}, priority="batch", idempotency_key=key)
    assert again.status_code == 200 and again.json() | {"status": None} == mine.json() | {"status": None,
                                                                                          "created": False}
    conflict = _submit(http["acme"], "calculator", {"question": "5 + 5"}, priority="batch", idempotency_key=key)
    assert conflict.status_code == 409
    assert conflict.json()["field"] == "idempotency_key" and "different submission" in conflict.json()["error"]
    with pytest.raises(IdempotencyConflict, match=mine.json()["run_id"]):
        as_tenant["acme"].submit("calculator", {"question": "2 + 2"}, priority="interactive", idempotency_key=key)
    for resp in (mine, theirs):
        assert tenant_fleet.client.wait(resp.json()["run_id"], timeout=60).status == "succeeded"


def _quota_refusal(resp: httpx.Response, quota: str) -> float:
    assert resp.status_code == 429, (resp.status_code, resp.text)
    body = resp.json()
    assert body["quota"] == quota and quota in body["error"] and "nothing was queued" in body["error"]
    assert int(resp.headers["retry-after"]) >= 1
    return body["retry_after_s"]


@pytest.mark.parametrize("priority, limit", [("batch", 2), ("interactive", 1)])
def test_runs_queued_and_in_flight_are_bounded_per_class_and_free_again(tenant_fleet, http, tmp_path,
                                                                         priority, limit):
    gate = tmp_path / "gate"
    held = [_submit(http["tight"], "gated", {"gate": str(gate)}, priority=priority) for _ in range(limit)]
    assert [r.status_code for r in held] == [201] * limit
    refused = _submit(http["tight"], "gated", {"gate": str(gate)}, priority=priority)
    counts = http["ops"].get("/v1/tenants").json()["tenants"]
    tight = next(t for t in counts if t["name"] == "tight")
    _quota_refusal(refused, f"max_active_{priority}")
    assert tight["active"][priority] == limit
    # Another tenant is not held back by this one's quota.
    assert _submit(http["acme"], "calculator", {"question": "1 + 1"}, priority=priority).status_code == 201
    gate.touch()
    for r in held:
        assert tenant_fleet.client.wait(r.json()["run_id"], timeout=60).status == "succeeded"
    after = _submit(http["tight"], "gated", {"gate": str(gate)}, priority=priority)
    assert after.status_code == 201, after.text
    assert tenant_fleet.client.wait(after.json()["run_id"], timeout=60).status == "succeeded"


def test_submissions_per_second_are_bounded_and_admitted_again(tenant_fleet, http):
    answers = [_submit(http["rated"], "calculator", {"question": "1 + 2"}, priority="batch") for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [201, 201]
    retry_s = _quota_refusal(answers[2], "submissions_per_s")
    assert 0 < retry_s <= 1.0  # one token comes back in 1/rate s
    again: list[httpx.Response] = []

    def admitted() -> bool:  # a refusal takes nothing from the bucket
        again.append(_submit(http["rated"], "calculator", {"question": "1 + 2"}, priority="batch"))
        return again[-1].status_code == 201
    launch.wait_until(admitted, 10, "a submission admitted again", interval_s=0.1)
    assert all(a.status_code == 429 for a in again[:-1])
    for a in [*answers[:2], again[-1]]:
        assert tenant_fleet.client.wait(a.json()["run_id"], timeout=60).status == "succeeded"


def test_model_tokens_per_day_are_bounded_until_the_next_utc_day(tenant_fleet, http):
    first = _submit(http["metered"], "calculator", {"question": "2 * 3"})
    assert first.status_code == 201
    run = tenant_fleet.client.wait(first.json()["run_id"], timeout=60)
    assert run.status == "succeeded" and run.tokens_in + run.tokens_out > 1
    refused = _submit(http["metered"], "calculator", {"question": "2 * 3"})
    retry_s = _quota_refusal(refused, "tokens_per_day")
    assert 0 < retry_s <= DAY_S
    tokens = next(t for t in http["ops"].get("/v1/tenants").json()["tenants"] if t["name"] == "metered")
    assert tokens["tokens_today"] == run.tokens_in + run.tokens_out
    # The next UTC day the tenant may submit again (the gate asked about that day).
    gate = QuotaGate(tenant_fleet.settings, tenant_fleet.client.store.redis)
    tomorrow = time.time() + retry_s + 1
    gate.take("metered", "interactive", 1, now=tomorrow)
    gate.give_back("metered", "interactive")
    with pytest.raises(QuotaExceeded):
        gate.take("metered", "interactive", 1)


def test_operators_see_every_tenant_and_a_tenant_its_own_row(tenant_fleet, http, gateway_url):
    rows = {t["name"]: t for t in http["ops"].get("/v1/tenants").json()["tenants"]}
    assert {"acme", "globex", "tight", "rated", "metered", "default"} <= set(rows)
    assert rows["acme"]["weight"] == 3 and rows["tight"]["quotas"]["max_active_batch"] == 2
    assert rows["acme"]["model_s"]["interactive"] > 0  # its runs above spent model time
    own = http["globex"].get("/v1/tenants").json()["tenants"]
    assert [t["name"] for t in own] == ["globex"]
    # The CLI on the fleet's host is the operator's; with --tenant it is that tenant's.
    env = {**tenant_fleet.env}
    runner = CliRunner()
    every = runner.invoke(cli, ["tenants", "--json"], env=env)
    assert every.exit_code == 0, every.output
    assert {"acme", "globex"} <= {t["name"] for t in json.loads(every.output)["tenants"]}
    scoped = runner.invoke(cli, ["--tenant", "globex", "tenants", "--json"], env=env)
    assert [t["name"] for t in json.loads(scoped.output)["tenants"]] == ["globex"]
    table = runner.invoke(cli, ["tenants"], env=env)
    assert table.exit_code == 0 and "acme" in table.output and "batch share" in table.output
    unknown = runner.invoke(cli, ["--tenant", "nobody", "tenants"], env=env)
    assert unknown.exit_code == 2 and "unknown tenant 'nobody'" in unknown.output
    # Prometheus: gauges labelled by tenant, usage counted by tenant.
    scrape = http["ops"].get("/metrics").text
    assert 'fleet_tenant_weight{tenant="acme"} 3.0' in scrape
    assert 'fleet_tenant_quota{quota="max_active_batch",tenant="tight"} 2.0' in scrape
    assert 'fleet_tenant_active_runs{priority="batch",tenant="tight"}' in scrape


def test_a_tenants_cli_does_not_show_another_tenants_run(tenant_fleet, http):
    run_id = _submit(http["acme"], "calculator", {"question": "What is 6 * 7?"}).json()["run_id"]
    tenant_fleet.client.wait(run_id, timeout=60)
    runner = CliRunner()
    hidden = runner.invoke(cli, ["--tenant", "globex", "runs", "show", run_id, "--json"], env=tenant_fleet.env)
    assert hidden.exit_code == 1 and json.loads(hidden.output) == {"error": f"no run '{run_id}'"}
    shown = runner.invoke(cli, ["--tenant", "acme", "runs", "show", run_id, "--json"], env=tenant_fleet.env)
    assert shown.exit_code == 0 and json.loads(shown.output)["tenant"] == "acme"


def test_another_tenants_batch_is_not_found(tenant_fleet, http, as_tenant):
    made = http["acme"].post("/v1/batches", json={"agent": "calculator", "inputs": [{"question": "1 + 1"}] * 3})
    assert made.status_code == 201, made.text
    batch_id = made.json()["batch_id"]
    assert http["acme"].get(f"/v1/batches/{batch_id}").status_code == 200
    _not_found_body(http["globex"].get(f"/v1/batches/{batch_id}"), f"batch '{batch_id}'")
    with pytest.raises(RunNotFound):
        as_tenant["globex"].batch_status(batch_id)
    for run_id in made.json()["run_ids"]:
        _not_found_body(http["globex"].get(f"/v1/runs/{run_id}"), f"run '{run_id}'")
        assert tenant_fleet.client.wait(run_id, timeout=60).status == "succeeded"


def test_listings_and_short_ids_show_a_tenant_its_own_runs_only(tenant_fleet, http, as_tenant):
    mine = _submit(http["acme"], "calculator", {"question": "What is 5 * 5?"}).json()["run_id"]
    theirs = _submit(http["globex"], "calculator", {"question": "What is 5 * 6?"}).json()["run_id"]
    for run_id in (mine, theirs):
        assert tenant_fleet.client.wait(run_id, timeout=60).status == "succeeded"
    acme = http["acme"].get("/v1/runs", params={"limit": 500})
    assert acme.status_code == 200, acme.text
    listed = {r["id"]: r["tenant"] for r in acme.json()["runs"]}
    assert mine in listed and theirs not in listed and set(listed.values()) == {"acme"}
    assert http["acme"].get("/v1/runs", params={"tenant": "globex"}).json()["runs"] == []
    ops = http["ops"].get("/v1/runs", params={"tenant": "globex", "limit": 500}).json()["runs"]
    assert theirs in {r["id"] for r in ops} and {r["tenant"] for r in ops} == {"globex"}
    listed_by_client = {r.id for r in as_tenant["acme"].runs(limit=500).runs}
    assert mine in listed_by_client and theirs not in listed_by_client
    # A short id of another tenant's run is not found, as its whole id is not.
    _not_found_body(http["acme"].get(f"/v1/runs/{theirs[:8]}"), f"run '{theirs[:8]}'")
    assert http["globex"].get(f"/v1/runs/{theirs[:8]}").json()["id"] == theirs
    assert http["ops"].get(f"/v1/runs/{mine[:8]}").json()["id"] == mine
    with pytest.raises(RunNotFound):
        as_tenant["acme"].get(theirs[:8])
