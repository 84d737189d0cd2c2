"""The runs index against a real Redis: kept by the writes that create, dispatch, end and reopen a
run; listings by every filter and paged by cursor; short ids within what a caller sees; entries
dropped once their record expired; what it costs per run."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from fleet.errors import AmbiguousRunId, InvalidSubmission, RunNotFound
from fleet.run.index import INDEXED_STATUSES, RunIndex
from fleet.run.records import RunRecord
from fleet.surfaces.client import FleetClient
from tests.support.waiting import poll

from .conftest import close_fleet, new_fleet

pytestmark = pytest.mark.integration

TENANTS = json.dumps([{"name": "acme"}, {"name": "globex"}])


@pytest.fixture
def ns(redis_url, triton, session_dir):
    """A fresh namespace with tenants acme and globex, no workers: runs are made by the store."""
    f = new_fleet(redis_url, triton, session_dir, "i", tenants=TENANTS)
    clients = {name: FleetClient(f.settings, tenant=name) for name in ("acme", "globex")}
    yield f, clients
    for c in clients.values():
        c.close()
    close_fleet(f)


def _record(created_at: float, tenant: str = "acme", agent: str = "calculator", priority: str = "interactive",
            run_id: str | None = None) -> RunRecord:
    return RunRecord(id=run_id or uuid.uuid4().hex, agent=agent, priority=priority, tenant=tenant,
                     status="queued", created_at=created_at, deadline_at=created_at + 3600,
                     input={"question": "What is 1 + 1?"})


def _ids(page) -> list[str]:
    return [r.id for r in page.runs]


def _all_pages(client: FleetClient, limit: int, **filters) -> tuple[list[str], int]:
    seen, cursor, pages = [], None, 0
    while True:
        page = client.runs(limit=limit, cursor=cursor, **filters)
        pages += 1
        seen += _ids(page)
        cursor = page.next_cursor
        if cursor is None:
            return seen, pages


def test_every_write_of_a_run_keeps_its_entries(ns):
    f, c = ns
    store, keys, r = f.client.store, f.settings.keys, f.client.store.redis
    now = time.time()
    ok, bad, again = (_record(now - i) for i in range(3))
    for rec in (ok, bad, again):
        store.create(rec)
    assert r.zscore(keys.runs_by("acme", "interactive", "calculator"), ok.id) == ok.created_at
    assert r.zscore(keys.runs_by_status("acme", "queued"), ok.id) == ok.created_at
    assert r.zscore(keys.runs_ids, ok.id) == 0
    store.transition(ok.id, "running")
    assert r.zscore(keys.runs_by_status("acme", "queued"), ok.id) is None
    assert r.zscore(keys.runs_by_status("acme", "running"), ok.id) == ok.created_at
    store.end(ok.id, "succeeded")
    # succeeded has no set: its run stays in the set by tenant, class and agent only
    assert [s for s in INDEXED_STATUSES if r.zscore(keys.runs_by_status("acme", s), ok.id) is not None] == []
    store.end(bad.id, "dead_lettered", error={"type": "PermanentError", "message": "tool exploded"})
    assert r.zscore(keys.runs_by_status("acme", "dead_lettered"), bad.id) == bad.created_at
    assert store.reopen(bad.id, {"calculate": 0}, {}) is True  # a replay: queued again
    assert r.zscore(keys.runs_by_status("acme", "dead_lettered"), bad.id) is None
    assert r.zscore(keys.runs_by_status("acme", "queued"), bad.id) == bad.created_at
    store.delete(again.id)  # a run whose publish failed: forgotten with its entries
    assert r.zscore(keys.runs_ids, again.id) is None
    assert r.zscore(keys.runs_by("acme", "interactive", "calculator"), again.id) is None
    assert r.zscore(keys.runs_by_status("acme", "queued"), again.id) is None
    assert _ids(c["acme"].runs()) == [ok.id, bad.id]


def test_a_run_made_again_for_a_replay_keeps_no_entry_of_its_old_life(ns):
    f, c = ns
    store, keys, r = f.client.store, f.settings.keys, f.client.store.redis
    old = _record(time.time() - 600)
    store.create(old)
    store.end(old.id, "dead_lettered", error={"type": "PermanentError", "message": "no"})
    r.delete(keys.run(old.id), keys.events(old.id))  # its record expired; the trim has not come by
    again = old.model_copy(update={"created_at": time.time(), "status": "queued"})
    store.restore(again, {}, [])
    assert r.zscore(keys.runs_by_status("acme", "dead_lettered"), old.id) is None
    assert r.zscore(keys.runs_by_status("acme", "queued"), old.id) == again.created_at
    assert [(row.id, row.status) for row in c["acme"].runs().runs] == [(old.id, "queued")]


def test_a_backlog_run_is_indexed_when_dispatched_or_ended_there(ns):
    f, c = ns
    acme, keys, r = c["acme"], f.settings.keys, f.client.store.redis
    waiting = acme.submit("writer", {"topic": "later"}, priority="batch")
    dropped = acme.submit("writer", {"topic": "never"}, priority="batch")
    assert r.zscore(keys.runs_ids, waiting) is None  # in the backlog: a compact record only
    listed = acme.runs()
    assert listed.runs == [] and listed.backlog == 2
    assert acme.cancel(dropped) is True  # ended in the backlog: a run hash now, indexed
    [record] = f.client.store.compact_records([waiting])
    assert f.client.store.promote([record]) == [True]  # what the dispatcher does
    page = acme.runs()
    assert {(row.id, row.status) for row in page.runs} == {(waiting, "queued"), (dropped, "cancelled")}
    assert r.zscore(keys.runs_by_status("acme", "cancelled"), dropped) is not None
    assert _ids(acme.runs(status="queued", priority="batch", agent="writer")) == [waiting]


def test_filters_narrow_each_other_and_another_tenants_runs_never_show(ns):
    f, c = ns
    store, acme, globex = f.client.store, c["acme"], c["globex"]
    now = time.time()
    made: dict[str, RunRecord] = {}
    plan = [("a-int-fail", "acme", "calculator", "interactive", "failed", 100),
            ("a-int-ok", "acme", "calculator", "interactive", "succeeded", 90),
            ("a-bat-fail", "acme", "writer", "batch", "failed", 80),
            ("a-int-old", "acme", "calculator", "interactive", "failed", 7200),
            ("a-int-dl", "acme", "solver", "interactive", "dead_lettered", 60),
            ("g-int-fail", "globex", "calculator", "interactive", "failed", 50)]
    for name, tenant, agent, priority, status, age in plan:
        rec = made[name] = _record(now - age, tenant, agent, priority)
        store.create(rec)
        error = {"type": "PermanentError", "message": f"Quota of {name} EXCEEDED"} if status != "succeeded" else None
        store.end(rec.id, status, **({"error": error} if error else {}))

    def names(page) -> list[str]:
        by_id = {rec.id: name for name, rec in made.items()}
        return [by_id[r.id] for r in page.runs]

    # "which interactive runs of tenant acme failed in the last hour?"
    hour = now - 3600
    assert names(f.client.runs(tenant="acme", priority="interactive", status="failed", since=hour)) == ["a-int-fail"]
    assert names(acme.runs(status=["failed", "dead_lettered"], priority="interactive")) == [
        "a-int-dl", "a-int-fail", "a-int-old"]
    assert names(acme.runs(status="succeeded")) == ["a-int-ok"]
    assert names(acme.runs(agent="writer")) == ["a-bat-fail"]
    assert names(acme.runs(error="a-int-DL exceeded")) == ["a-int-dl"]  # any case, type or message
    assert names(acme.runs(since=now - 95, until=now - 70)) == ["a-bat-fail", "a-int-ok"]
    # A tenant sees its own runs only; asking for another's is asking for nothing.
    assert names(globex.runs()) == ["g-int-fail"]
    assert globex.runs(tenant="acme").runs == []
    assert names(globex.runs(error="exceeded")) == ["g-int-fail"]
    # The operator sees all, and filters by tenant.
    assert len(f.client.runs().runs) == 6
    assert names(f.client.runs(tenant="globex")) == ["g-int-fail"]
    with pytest.raises(InvalidSubmission) as bad:
        acme.runs(status="finished")
    assert bad.value.field == "status.0"
    with pytest.raises(InvalidSubmission) as bad:
        acme.runs(limit=0)
    assert bad.value.field == "limit"


def test_pages_follow_each_other_without_gaps_or_repeats(ns):
    f, c = ns
    store, acme = f.client.store, c["acme"]
    now = time.time()
    records = [_record(now - 1000 + i // 40, agent=("calculator", "solver")[i % 2],
                       priority=("interactive", "batch")[i % 3 == 0]) for i in range(250)]
    for rec in records:  # 40 runs share each creation time, as a bulk submission's chunk does
        store.create(rec)
    for rec in records[::5]:
        store.end(rec.id, "failed", error={"type": "PermanentError", "message": "no"})
    newest_first = [rec.id for rec in sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)]
    seen, pages = _all_pages(acme, 17)
    assert seen == newest_first and pages == -(-250 // 17)
    failed = [i for i in newest_first if i in {rec.id for rec in records[::5]}]
    assert _all_pages(acme, 7, status="failed")[0] == failed
    batch_solver = [rec.id for rec in sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)
                    if rec.priority == "batch" and rec.agent == "solver"]
    assert _all_pages(acme, 9, priority="batch", agent="solver")[0] == batch_solver
    last = acme.runs(limit=250)
    assert len(last.runs) == 250 and last.next_cursor is None


def test_a_short_id_names_one_run_the_caller_may_see(ns):
    f, c = ns
    store, acme, globex = f.client.store, c["acme"], c["globex"]
    now = time.time()
    mine = _record(now, run_id="abcdef01" + uuid.uuid4().hex[8:])
    twin = _record(now, run_id="abcdef02" + uuid.uuid4().hex[8:])
    theirs = _record(now, tenant="globex", run_id="abcdef03" + uuid.uuid4().hex[8:])
    for rec in (mine, twin, theirs):
        store.create(rec)
    assert acme.get(mine.id[:8]).id == mine.id
    assert acme.resolve(mine.id) == mine.id
    with pytest.raises(AmbiguousRunId) as many:
        acme.get("abcdef0")
    assert many.value.candidates == [mine.id, twin.id] and many.value.field == "run_id"
    assert "give more digits" in str(many.value)
    # globex's prefix resolves among globex's runs only: acme's do not make it ambiguous.
    assert globex.get("abcdef0").id == theirs.id
    with pytest.raises(RunNotFound, match="no run 'abcdef01'"):
        globex.get("abcdef01")
    assert f.client.resolve("abcdef03") == theirs.id
    for bad in ("abcde", "xyz123", "ABCDEF01"):
        with pytest.raises(InvalidSubmission) as invalid:
            acme.get(bad)
        assert invalid.value.field == "run_id"


def test_entries_go_once_their_record_expired(redis_url, triton, session_dir):
    f = new_fleet(redis_url, triton, session_dir, "i", result_ttl_s=1)
    try:
        store, keys, r = f.client.store, f.settings.keys, f.client.store.redis
        index = RunIndex(f.settings, r)
        now = time.time()
        done, failed, live = (_record(now - 5 + i) for i in range(3))
        for rec in (done, failed, live):
            store.create(rec)
        store.end(done.id, "succeeded")
        store.end(failed.id, "failed", error={"type": "PermanentError", "message": "no"})
        assert index.trim() == 0  # records there: nothing goes
        poll(lambda: r.exists(keys.run(done.id), keys.run(failed.id)), lambda n: n == 0, 10)
        assert index.trim() == 2
        assert [rec for rec in (done.id, failed.id, live.id) if r.zscore(keys.runs_ids, rec) is not None] == [live.id]
        assert r.zcard(keys.runs_by_status("acme", "failed")) == 0
        assert r.zcard(keys.runs_by("acme", "interactive", "calculator")) == 1
        assert _ids(f.client.runs()) == [live.id]
        assert index.trim() == 0
    finally:
        close_fleet(f)


def test_what_the_index_costs_per_run(ns, capsys):
    """Bytes of the index per run, read with MEMORY USAGE of its keys (README quotes this)."""
    f, _ = ns
    store, keys, r = f.client.store, f.settings.keys, f.client.store.redis
    now, n = time.time(), 2000
    records = [_record(now - n + i, agent=("calculator", "solver", "writer")[i % 3]) for i in range(n)]
    pipe_size = 200
    for start in range(0, n, pipe_size):
        for rec in records[start:start + pipe_size]:
            store.create(rec)
    for rec in records[: n // 2]:
        store.end(rec.id, "succeeded")
    for rec in records[n // 2:]:
        store.end(rec.id, "failed", error={"type": "PermanentError", "message": "no"})
    index_keys = [k for k in r.scan_iter(f"{keys.runs_index_base}*")]
    total = sum(r.memory_usage(k, samples=0) or 0 for k in index_keys)
    per_run = total / n
    print(f"\nruns index: {per_run:.0f} bytes per run ({n} runs, half succeeded, half failed)")
    assert 100 < per_run <= 600, per_run
