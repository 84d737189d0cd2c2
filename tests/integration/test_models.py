"""Models as a catalog, end to end on two real Tritons: a step names a model or a role, each
model has its own pool and prices, and a step that allows it falls back to the small model
when the medium model's replica is killed; without a fallback a run is refused or ends, never
hangs."""

from __future__ import annotations

import json
import signal
import uuid

import pytest

from fleet.errors import Overloaded
from fleet.ops import launch
from fleet.run.records import TERMINAL

from .conftest import TEST_SIM_PARAMS, TritonInfo, close_fleet, new_fleet, tally
from .test_cli import run_cli

pytestmark = pytest.mark.integration

SMALL_PARAMS = {"ttft_ms": 5, "prefill_ms_per_token": 0.02, "tpot_ms": 1, "load_factor": 0.02}


@pytest.fixture(scope="module")
def two_models(redis_url, session_dir):
    root = session_dir / f"models-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    medium_repo = launch.sim_repository(root / "medium-models", "medium_sim", **TEST_SIM_PARAMS)
    small_repo = launch.sim_repository(root / "small-models", "small_sim", **SMALL_PARAMS)
    try:
        medium = launch.start_triton(procs, root / "medium", ["medium_sim"], name="medium", repository=medium_repo)
        small = launch.start_triton(procs, root / "small", ["small_sim"], name="small", repository=small_repo)
        models = [{"name": "small_sim", "replicas": [{"name": "small-1", "grpc_url": small.grpc_url,
                                                      "metrics_url": small.metrics_url}],
                   "price_per_1k_output_tokens": 0.1},
                  {"name": "medium_sim", "price_per_1k_output_tokens": 1.0}]
        f = new_fleet(redis_url, TritonInfo(medium.grpc_url, medium.http_url, medium.metrics_url), session_dir, "m",
                      models=json.dumps(models), model_roles=json.dumps({"small": "small_sim"}),
                      triton_connect_wait_s=2, replica_probe_interval_s=1)
        f.start_worker("inference", "llm", "threads", 8)
        f.start_worker("tools", "tool", "threads", 4)
        yield f, procs
    finally:
        if "f" in locals():
            close_fleet(f)
        procs.stop()


def test_each_step_runs_on_the_model_it_names_and_is_priced_as_that_model(two_models):
    f, _ = two_models
    run_id = f.client.submit("triage", {"message": "My invoice is wrong."})
    run = f.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    steps = {s.key: s for s in run.steps}
    assert (steps["classify"].model, steps["answer"].model) == ("small_sim", "medium_sim")
    assert not steps["answer"].fallback
    assert steps["classify"].replica == "small-1"
    assert steps["classify"].cost == pytest.approx(steps["classify"].tokens_out * 0.1 / 1000)
    assert steps["answer"].cost == pytest.approx(steps["answer"].tokens_out * 1.0 / 1000)
    shown = f.client.get(run_id)
    assert [s.model for s in shown.steps] == ["small_sim", "medium_sim"]
    status = json.loads(run_cli(f, "status", "--json").stdout)
    assert [(r["name"], r["state"]) for r in status["models"]["small_sim"]] == [("small-1", "up")]
    agents = json.loads(run_cli(f, "agents", "--json").stdout)["agents"]
    triage = next(a for a in agents if a["name"] == "triage") if isinstance(agents, list) else agents["triage"]
    assert [(st["name"], st["model"], st["fallback"]) for st in triage["steps"]] == [
        ("classify", "small", None), ("answer", None, "small")]


def test_with_the_medium_model_down_a_step_that_allows_it_falls_back_and_others_never_hang(two_models):
    f, procs = two_models
    procs.stop("medium", sig=signal.SIGKILL)
    ids = [f.client.submit("triage", {"message": f"question {i}"}, deadline_s=30) for i in range(6)]
    counts = tally(f.client, ids, timeout=60)
    assert counts["completed"] == len(ids), (counts, [f.client.get(r).error for r in ids])
    for run_id in ids:
        steps = {s.key: s for s in f.client.get(run_id).steps}
        assert steps["answer"].model == "small_sim" and steps["answer"].fallback
    # Admission knows the fallback serves it: a run that may fall back is still admitted.
    later = f.client.submit("triage", {"message": "after the board knows"}, deadline_s=30)
    assert f.client.wait(later, timeout=30).status == "succeeded"
    # A run whose steps allow no fallback is refused at the door or ends; it never hangs.
    others = []
    for i in range(3):
        try:
            others.append(f.client.submit("writer", {"topic": f"no fallback {i}"}, deadline_s=15))
        except Overloaded:
            pass
    tally(f.client, others, timeout=40)
    with pytest.raises(Overloaded, match="no replica of the inference pool is up"):
        f.client.submit("writer", {"topic": "refused"}, deadline_s=15)
    assert all(f.client.get(r).status in TERMINAL - {"succeeded"} for r in others)
