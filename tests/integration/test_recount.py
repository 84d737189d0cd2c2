"""Counters that drift are recounted from the run records: the tenants' places and the ledger of
admitted interactive runs, against a real Redis, in a namespace of their own with no workers (the
runs stay queued, so the right counts are known)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from fleet.run.records import RunRecord, new_run_id
from fleet.scheduling.admitted import AdmittedRuns
from fleet.scheduling.dispatch import Dispatcher
from fleet.scheduling.quotas import QuotaGate
from fleet.scheduling.recount import CLAIM_GRACE_S, Recount

from .conftest import close_fleet, new_fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def ns(redis_url, triton, session_dir):
    f = new_fleet(redis_url, triton, session_dir, "c", batch_dispatch_window=10)
    yield f
    close_fleet(f)


def _places(f) -> dict[str, int]:  # noqa: ANN001
    return {k: int(v) for k, v in f.client.store.redis.hgetall(f.settings.keys.tenant_active).items() if int(v)}


def _recount(f, now: float | None = None):  # noqa: ANN001
    return Recount(f.settings, f.client.store.redis, f.client.agents).run(now)


def test_a_leaked_place_and_a_lost_one_are_recounted_from_the_runs(ns):
    ids = [ns.client.submit("writer", {"topic": f"t{i}"}, priority="batch") for i in range(5)]
    quotas = QuotaGate(ns.settings, ns.client.store.redis)
    quotas.take("default", "batch", 2)  # an admission that died holding two places
    ns.client.store.redis.hincrby(ns.settings.keys.tenant_active, "default|interactive", -1)  # a lost one
    before = _places(ns)
    kept = _recount(ns)  # the dead admission is young: its places may still become runs
    late = _recount(ns, now=time.time() + CLAIM_GRACE_S + 1)
    assert before == {"default|batch": 7, "default|interactive": -1}
    assert kept.places == {"default|interactive": (-1, 0)}
    assert late.places == {"default|batch": (7, 5)}
    assert _places(ns) == {"default|batch": len(ids)}
    # Runs moving from the backlog into the queues are counted once, wherever they are.
    dispatched = Dispatcher(ns.settings, ns.client.app, ns.client.agents, ns.client.store).tick()
    again = _recount(ns)
    assert dispatched == 5 and not again.changed and _places(ns) == {"default|batch": 5}
    assert all(ns.client.store.status(r) == "queued" for r in ids)


def test_the_ledger_of_admitted_runs_is_recounted_from_the_runs(ns):
    r, keys = ns.client.store.redis, ns.settings.keys
    now = time.time()
    live = RunRecord(id=new_run_id(), agent="calculator", priority="interactive", status="queued",
                     created_at=now, deadline_at=now + 30, input={"question": "What is 1 + 1?"})
    ns.client.store.create(live)  # an interactive run the ledger lost (a failover took its entry)
    ledger = AdmittedRuns(ns.settings, r)
    ghost = new_run_id()
    r.zadd(keys.admitted("interactive"), {ghost: now + 30})  # an entry whose run never came to be
    r.hset(keys.admitted_steps("interactive"), ghost, 2)
    out = _recount(ns)
    assert (out.ledger_dropped, out.ledger_added) == (1, 1)
    assert r.zrange(keys.admitted("interactive"), 0, -1, withscores=True) == [(live.id, pytest.approx(now + 30))]
    assert r.hget(keys.admitted_steps("interactive"), live.id) == "2"  # the calculator's model steps
    assert ledger.forecast(now, parallel=1, step_s=1.0).ahead == 2


def test_a_place_on_its_way_to_becoming_a_run_is_kept_by_a_recount(ns):
    quotas = QuotaGate(ns.settings, ns.client.store.redis)
    claim = quotas.take("default", "batch", 1)  # taken; the run's record is not written yet
    during = _recount(ns)
    held = _places(ns)
    quotas.give_back("default", "batch", 1, claim)  # the admission is refused further on
    after = _recount(ns)
    assert not during.changed and held == {"default|batch": 1}
    assert not after.changed and _places(ns) == {}


def test_recounts_in_the_middle_of_a_burst_of_admissions_correct_nothing(ns):
    """Submissions from four threads while recounts run in a loop: a recount that comes between an
    admission's quota and its record finds nothing to correct (the place is its run's, on the
    way), and every admission counts its place once."""
    stop = threading.Event()
    recounts: list[tuple[int, bool]] = []

    def recount_loop() -> None:
        while not stop.is_set():
            claims = ns.client.store.redis.hvals(ns.settings.keys.quota_claims)
            on_the_way = sum(int(v) > 0 for v in claims)
            recounts.append((on_the_way, _recount(ns).changed))

    def submit(n: int) -> None:
        for i in range(n):
            ns.client.submit("writer", {"topic": f"burst {uuid.uuid4().hex}"}, priority="batch")

    looper = threading.Thread(target=recount_loop)
    looper.start()
    submitters = [threading.Thread(target=submit, args=(60,)) for _ in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join()
    stop.set()
    looper.join()
    counted = _places(ns)
    # Recounts ran while admissions held places not yet turned into runs.
    assert len(recounts) >= 5 and sum(on_the_way > 0 for on_the_way, _ in recounts) >= 1
    assert [changed for _, changed in recounts if changed] == []
    assert counted == {"default|batch": 240}
