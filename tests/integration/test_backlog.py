"""The batch backlog: compact queued runs, bulk submission, batch jobs, and the dispatcher's
fair share of batch model time between tenants.

Real Redis, real Triton (dev model), real worker processes, each test in its own namespace.
"""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from fleet.broker.queues import queue_name
from fleet.errors import IdempotencyConflict, InvalidSubmission, RunNotFound
from fleet.scheduling.backlog import Backlog
from fleet.scheduling.dispatch import Dispatcher
from fleet.scheduling.reconcile import Reconciler
from fleet.surfaces.client import FleetClient
from fleet.surfaces.gateway import create_gateway

from .conftest import Fleet, close_fleet, new_fleet

pytestmark = pytest.mark.integration

TENANTS = json.dumps([{"name": "acme", "weight": 1}, {"name": "globex", "weight": 1}])
GATEWAY_KEY = "backlog-test-key"


@pytest.fixture
def namespace(redis_url, triton, session_dir):
    """A fresh fleet namespace with tenants acme and globex (and the default one, whose key the
    gateway takes), no workers yet; tests start the ones they need."""
    made: list[tuple[Fleet, list[FleetClient]]] = []

    def make(**overrides) -> tuple[Fleet, dict[str, FleetClient]]:
        f = new_fleet(redis_url, triton, session_dir, "b", **{"tenants": TENANTS, "api_keys": GATEWAY_KEY,
                                                                **overrides})
        clients = {name: FleetClient(f.settings, tenant=name) for name in ("acme", "globex")}
        clients["admin"] = FleetClient(f.settings, admin=True)
        made.append((f, list(clients.values())))
        return f, clients

    yield make
    for f, clients in made:
        for client in clients:
            client.close()
        close_fleet(f)


def _batch(agent: str, topics: list[str], **extra) -> list[dict]:
    return [{"agent": agent, "input": {"topic": t}, "priority": "batch", **extra} for t in topics]


def test_a_queued_batch_run_costs_at_most_1kb_of_redis(namespace):
    f, c = namespace()  # no worker: nothing is dispatched
    acme, r, keys = c["acme"], c["acme"].store.redis, f.settings.keys
    n = 5000
    subs = [{"agent": "writer", "priority": "batch", "idempotency_key": f"nightly-2026-12-03:row-{i:07d}",
             "input": {"topic": f"section {i} of the quarterly report: revenue, costs, hiring and the outlook "
                                f"for the next two quarters, in plain words for the board"}} for i in range(n)]
    assert 100 <= len(json.dumps(subs[0]["input"])) <= 200  # a realistic input
    before = r.info("memory")["used_memory"]
    results = acme.submit_many(subs, batch_id="nightly")
    after = r.info("memory")["used_memory"]
    per_run = (after - before) / n
    assert all(x.created and x.error is None for x in results)
    assert per_run <= 1024, per_run
    # Only compact records and backlog entries: no run hash, no events, no message, no index entry.
    ids = [x.run_id for x in results]
    assert Backlog(f.settings, r).sizes() == {"acme": n}
    assert r.exists(*[keys.run(i) for i in ids[:100]]) == 0
    assert r.exists(*[keys.events(i) for i in ids[:100]]) == 0
    assert r.zcard(keys.active_runs) == 0 and r.llen(queue_name(f.settings, "llm", "batch")) == 0
    assert r.zcard(keys.runs_ids) == 0  # the runs index takes a backlog run when it is dispatched
    assert acme.batch_status("nightly").counts == {"queued": n}


def test_a_backlog_run_reads_cancels_and_repeats_like_any_run(namespace):
    f, c = namespace()
    acme, globex = c["acme"], c["globex"]
    r, keys = acme.store.redis, f.settings.keys
    kept = acme.submit("oneshot", {"topic": "kept"}, priority="batch", idempotency_key="k1")
    assert acme.submit("oneshot", {"topic": "kept"}, priority="batch", idempotency_key="k1") == kept
    with pytest.raises(IdempotencyConflict):
        acme.submit("oneshot", {"topic": "another"}, priority="batch", idempotency_key="k1")
    dropped = acme.submit("oneshot", {"topic": "dropped"}, priority="batch")
    assert r.exists(keys.run(kept)) == 0  # still in the backlog: a compact record only

    run = acme.get(kept)
    assert (run.status, run.priority, run.tenant, run.input) == ("queued", "batch", "acme", {"topic": "kept"})
    assert acme.wait(kept, timeout=0.5).status == "queued"  # followed, not reported gone
    assert list(acme.events(kept, timeout=0.3)) == []
    with pytest.raises(RunNotFound):
        globex.get(kept)
    with pytest.raises(RunNotFound):
        globex.cancel(kept)
    assert acme.cancel(dropped) is True and acme.cancel(dropped) is False
    assert acme.get(dropped).status == "cancelled"
    assert [e["status"] for e in acme.events(dropped, timeout=5)] == ["cancelled"]
    # The reconciler does not know backlog runs: nothing to send again.
    assert r.zscore(keys.active_runs, kept) is None
    assert Reconciler(f.settings, acme.app, acme.agents, acme.store).sweep() == []

    # The gateway's routes (its client is the default tenant's).
    own = f.client.submit("oneshot", {"topic": "over http"}, priority="batch")
    gone = f.client.submit("oneshot", {"topic": "cancelled over http"}, priority="batch")
    with TestClient(create_gateway(f.settings), headers={"X-API-Key": GATEWAY_KEY}) as http:
        assert http.get(f"/v1/runs/{own}").json()["status"] == "queued"
        assert http.get(f"/v1/runs/{kept}").status_code == 404  # acme's
        cancel = http.delete(f"/v1/runs/{gone}")
        assert cancel.status_code == 200 and cancel.json() == {"run_id": gone, "cancelled": True,
                                                               "status": "cancelled"}

    # Followed from the backlog through its dispatch to its end. The worker is started with
    # no gateway open: a fork while gRPC threads are busy can crash the child before it execs.
    followed: list[dict] = []
    follower = threading.Thread(target=lambda: followed.extend(acme.events(kept, timeout=120)))
    follower.start()
    f.start_worker("inference", "llm", "threads", 4)
    with TestClient(create_gateway(f.settings), headers={"X-API-Key": GATEWAY_KEY}) as http:
        with http.stream("GET", f"/v1/runs/{own}/events", timeout=120) as sse:
            lines = [line for line in sse.iter_lines() if line.startswith("data:")]
        follower.join(timeout=120)
    assert json.loads(lines[-1][5:])["status"] == "succeeded"
    statuses = [e["status"] for e in followed if e["type"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert acme.get(kept).status == "succeeded"
    # The cancelled ones were never dispatched.
    for run_id, client in ((dropped, acme), (gone, f.client)):
        run = client.get(run_id)
        assert run.status == "cancelled" and run.steps == []


def test_submit_many_keeps_the_good_items_and_batches_belong_to_their_tenant(namespace):
    f, c = namespace()
    acme, globex, admin = c["acme"], c["globex"], c["admin"]
    subs = [
        *_batch("oneshot", ["good 0"], idempotency_key="row-0"),
        {"agent": "oneshot", "input": {"topic": 7}, "priority": "batch"},              # wrong type
        {"agent": "no_such_agent", "input": {}, "priority": "batch"},                  # unknown agent
        {"agent": "oneshot", "input": {"topic": "x"}, "priority": "urgent"},          # bad priority
        *_batch("oneshot", ["good 4"]),
        *_batch("oneshot", ["not good 0"], idempotency_key="row-0"),                 # key of another input
        *_batch("oneshot", ["good 0"], idempotency_key="row-0"),                     # a repeat of item 0
    ]
    results = acme.submit_many(subs, batch_id="mixed")
    assert [x.error is None for x in results] == [True, False, False, False, True, False, True]
    assert [getattr(x.error, "field", None) for x in results[1:4]] == ["input.topic", "agent", "priority"]
    assert isinstance(results[5].error, IdempotencyConflict)
    assert results[6].run_id == results[0].run_id and not results[6].created
    assert [x.created for x in results if x.run_id] == [True, True, False]

    status = acme.batch_status("mixed")
    assert (status.runs, status.counts, status.tenant, status.done) == (2, {"queued": 2}, "acme", False)
    assert admin.batch_status("mixed").runs == 2  # an operator sees every tenant's
    with pytest.raises(RunNotFound):
        globex.batch_status("mixed")
    with pytest.raises(RunNotFound):
        acme.batch_status("no-such-batch")
    with pytest.raises(InvalidSubmission) as bad:
        acme.submit_many(subs[:1], batch_id="not a valid id")
    assert bad.value.field == "batch_id"

    with TestClient(create_gateway(f.settings), headers={"X-API-Key": GATEWAY_KEY}) as http:
        body = {"agent": "oneshot", "items": [{"id": 1, "input": {"topic": "one"}}, {"id": 2, "input": {"topic": 5}}]}
        first = http.post("/v1/batches", json=body)
        assert first.status_code == 201, first.text
        made = first.json()
        assert made["created"] == 1 and made["run_ids"][1] is None
        assert [(e["index"], e["id"], e["field"]) for e in made["errors"]] == [(1, 2, "input.topic")]
        again = http.post("/v1/batches", json={**body, "batch_id": made["batch_id"]}).json()
        assert again["run_ids"] == made["run_ids"] and again["created"] == 0
        got = http.get(f"/v1/batches/{made['batch_id']}")
        assert got.status_code == 200 and got.json()["counts"] == {"queued": 1}
        assert http.get("/v1/batches/mixed").status_code == 404  # acme's batch
        assert http.post("/v1/batches", json={"agent": "oneshot"}).status_code == 422
    assert f.client.get(made["run_ids"][0]).batch == made["batch_id"]


def test_runs_popped_by_a_dispatcher_that_died_are_sent_once(namespace):
    f, c = namespace()
    acme = c["acme"]
    r, keys = acme.store.redis, f.settings.keys
    ids = [x.run_id for x in acme.submit_many(_batch("oneshot", [f"popped {i}" for i in range(6)]))]
    # A dispatcher pops four runs and dies before creating them.
    popped = Backlog(f.settings, r).pop(4)
    assert [p.run_id for p in popped] == ids[:4] and {p.tenant for p in popped} == {"acme"}
    assert acme.store.statuses(ids) == ["queued"] * 6  # not lost: still readable, still queued
    assert acme.cancel(ids[3]) is True  # one of them is cancelled meanwhile
    assert r.zcard(keys.active_runs) == 0 and r.llen(queue_name(f.settings, "llm", "batch")) == 0

    successor = Dispatcher(f.settings, acme.app, acme.agents, acme.store)
    assert successor.recover(older_than_s=0) == 3
    assert successor.recover(older_than_s=0) == 0  # sent once
    assert r.llen(queue_name(f.settings, "llm", "batch")) == 3
    assert all(r.zscore(keys.active_runs, i) is not None for i in ids[:3])
    assert r.hlen(keys.dispatched) == 3  # the cancelled one left the window

    f.start_worker("inference", "llm", "threads", 4)  # its dispatcher sends the other two
    runs = [acme.wait(i, timeout=120) for i in ids]
    assert [x.status for x in runs] == ["succeeded"] * 3 + ["cancelled"] + ["succeeded"] * 2
    assert all(len(x.steps) == 1 and x.steps[0].attempts == 1 for x in runs if x.status == "succeeded")
    assert runs[3].steps == []


def _dispatched_at(client: FleetClient, run_id: str) -> str:
    """The id of the run's first event: written when the dispatcher created the run."""
    [(event_id, fields)] = client.store.redis.xrange(client.store.events_key(run_id), count=1)
    assert fields == {"type": "status", "status": "queued"}
    ms, _, seq = event_id.partition("-")
    return f"{int(ms):015d}-{int(seq):06d}"


@pytest.mark.parametrize(("weights", "share"), [((1, 1), 0.50), ((1, 3), 0.75)])
def test_batch_model_time_is_shared_by_weight(namespace, weights, share):
    tenants = [{"name": "acme", "weight": weights[0]}, {"name": "globex", "weight": weights[1]}]
    f, c = namespace(tenants=json.dumps(tenants), batch_dispatch_window=4)
    acme, globex = c["acme"], c["globex"]
    # acme's big batch is queued first, then globex's small one; both wait in the backlog
    # until the worker starts.
    a_ids = [x.run_id for x in acme.submit_many(_batch("oneshot", [f"acme {i}" for i in range(60)]))]
    b_ids = [x.run_id for x in globex.submit_many(_batch("oneshot", [f"globex {i}" for i in range(20)]))]
    f.start_worker("inference", "llm", "threads", 4, classes=("batch",))
    assert [globex.wait(i, timeout=180).status for i in b_ids] == ["succeeded"] * 20
    # The window where both were backlogged: until globex's last run was dispatched.
    end = max(_dispatched_at(globex, i) for i in b_ids)
    a_in = [i for i in a_ids if acme.store.redis.exists(acme.store.events_key(i))
            and _dispatched_at(acme, i) <= end]
    for run_id in set(a_ids) - set(a_in):  # the rest of acme's batch is not needed
        acme.cancel(run_id)
    a_runs = [acme.wait(i, timeout=120) for i in a_in]
    b_runs = [globex.get(i) for i in b_ids]
    counted = len(b_runs) / (len(b_runs) + len(a_runs))
    a_s = sum(s.model_s or 0.0 for x in a_runs for s in x.steps)
    b_s = sum(s.model_s or 0.0 for x in b_runs for s in x.steps)
    timed = b_s / (a_s + b_s)
    assert abs(counted - share) <= 0.10, (counted, len(a_runs))
    assert abs(timed - share) <= 0.10, (timed, a_s, b_s)
    # And acme was not starved: it had runs dispatched while globex was backlogged.
    assert len(a_runs) >= 3


def test_a_batch_job_submits_every_line_up_front_and_collects_by_status(namespace, tmp_path):
    from fleet.surfaces.batch import BatchRunner

    f, c = namespace()
    acme = c["acme"]
    src, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    lines = [json.dumps({"topic": f"up front {i}"}) for i in range(30)]
    lines[11] = json.dumps({"topic": 11})  # the agent's schema rejects it
    src.write_text("\n".join(lines) + "\n")
    runner = BatchRunner(acme, "oneshot", out, progress_stream=open(tmp_path / "progress", "w"))
    f.start_worker("inference", "llm", "threads", 4)
    summary = runner.run(src)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == list(range(1, 31))
    by_line = {r["line"]: r for r in rows}
    assert by_line[12]["status"] == "rejected" and "input.topic" in by_line[12]["error"]
    assert summary.created == 29 and summary.statuses == {"succeeded": 29, "rejected": 1}
    status = acme.batch_status(summary.batch_id)
    assert (status.runs, status.counts, status.done) == (29, {"succeeded": 29}, True)
    assert all(acme.get(r["run_id"]).batch == summary.batch_id for r in rows if r["run_id"])
    with pytest.raises(RunNotFound):
        c["globex"].batch_status(summary.batch_id)
