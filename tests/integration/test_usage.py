"""Cost, usage and budgets against real workers, Redis and Triton: usage totals and the
Prometheus counters equal the sums over the run records, a looping agent stops at its token
budget before its next model call, a model call is clipped to what its budget leaves, bad
budgets are refused at the door, and the CLI's timeline names every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.broker.queues import all_queues
from fleet.errors import InvalidSubmission
from fleet.ops import launch
from fleet.run.cost import Prices
from fleet.run.records import RunRecord
from fleet.run.usage import UsageReport, UsageRow

from .conftest import Fleet, close_fleet, new_fleet

pytestmark = pytest.mark.integration

PRICES = {"price_per_1k_input_tokens": 0.5, "price_per_1k_output_tokens": 1.5, "price_per_gpu_s": 0.01}
FIGURES = ("steps", "tokens_in", "tokens_out", "model_s", "queue_s", "tool_s", "cost")
LOOPER_QUESTION = {"question": "How many words are in this sentence about queues and deadlines?"}


@dataclass
class PricedFleet(Fleet):
    metrics_urls: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def pfleet(redis_url, triton, session_dir) -> Iterator[PricedFleet]:
    base = new_fleet(redis_url, triton, session_dir, "u", **PRICES)
    f = PricedFleet(base.settings, base.env, base.procs, base.client)
    try:
        f.metrics_urls = [f.start_metered_worker("inference", "llm", "threads", 8),
                          f.start_metered_worker("tools", "tool", "prefork", 2)]
        yield f
    finally:
        close_fleet(f)


def _expected(runs: list[RunRecord], key) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Usage figures summed over the runs' step records, by ``key(run)``."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        sums = out.setdefault(key(run), dict.fromkeys(("runs", *FIGURES), 0.0))
        sums["runs"] += 1
        for s in run.steps:
            if s.status == "skipped":
                continue
            sums["steps"] += 1
            sums["tokens_in"] += s.tokens_in
            sums["tokens_out"] += s.tokens_out
            sums["model_s"] += s.model_s or 0.0
            sums["queue_s"] += s.queue_wait_s or 0.0
            sums["tool_s"] += (s.duration_s or 0.0) if s.kind == "tool" else 0.0
            sums["cost"] += s.cost
    return out


def _row(report: UsageReport, key: str) -> UsageRow:
    return next((r for r in report.rows if r.key == key), UsageRow(key=key))


def _delta(after: UsageRow, before: UsageRow, figure: str) -> float:
    return getattr(after, figure) - getattr(before, figure)


def _scrape(urls: list[str]) -> dict[tuple[str, frozenset], float]:
    samples: dict[tuple[str, frozenset], float] = {}
    for url in urls:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                samples[key] = samples.get(key, 0.0) + s.value
    return samples


def test_usage_and_its_counters_equal_the_sums_over_the_run_records(pfleet):
    client = pfleet.client
    before = {by: client.usage(by, 3600) for by in ("agent", "class", "tenant")}
    scraped_before = _scrape(pfleet.metrics_urls)
    ids = [client.submit("calculator", {"question": q}) for q in ("What is 6 * 7?", "What is 12 * 7 + 3?")]
    ids += [client.submit("writer", {"topic": t}, priority="batch") for t in ("queues", "deadlines")]
    ids.append(client.submit("solver", {"question": "What is (17 + 4) * 3?"}))
    runs = [client.wait(r, timeout=60) for r in ids]
    assert [r.status for r in runs] == ["succeeded"] * len(runs)
    # A run is counted by the worker that ended it, just after its status changed.
    launch.wait_until(lambda: client.usage("agent", 3600).total.runs - before["agent"].total.runs == len(runs),
                      10, "usage of the runs")

    prices = Prices(**{k.removeprefix("price_"): v for k, v in PRICES.items()})
    for run in runs:
        for s in run.steps:
            if s.model_s is not None:  # each model step priced at the fleet's prices
                assert s.cost == pytest.approx(prices.cost(s.tokens_in, s.tokens_out, s.model_s), rel=1e-9)
        assert run.cost == pytest.approx(sum(s.cost for s in run.steps)) and run.cost > 0

    for by, key in (("agent", lambda r: r.agent), ("class", lambda r: r.priority), ("tenant", lambda r: r.tenant)):
        after = client.usage(by, 3600)
        for name, sums in _expected(runs, key).items():
            got, was = _row(after, name), _row(before[by], name)
            for figure, value in sums.items():
                assert _delta(got, was, figure) == pytest.approx(value, rel=1e-9, abs=1e-9), (by, name, figure)
    assert _row(client.usage("agent", 3600), "writer").tool_s == _row(before["agent"], "writer").tool_s  # no tools

    # Prometheus counts the same, by agent and class.
    expected = _expected(runs, lambda r: (r.agent, r.priority))
    names = {"runs": "fleet_usage_runs_total", "tokens_in": "fleet_usage_tokens_in_total",
             "tokens_out": "fleet_usage_tokens_out_total", "model_s": "fleet_usage_model_seconds_total",
             "queue_s": "fleet_usage_queue_seconds_total", "tool_s": "fleet_usage_tool_seconds_total",
             "cost": "fleet_usage_cost_total"}

    def counted(samples: dict, figure: str, agent: str, priority: str) -> float:
        key = frozenset({("tenant", "default"), ("agent", agent), ("priority", priority)})
        return samples.get((names[figure], key), 0.0)

    found: list[dict] = []
    launch.wait_until(lambda: found.append(_scrape(pfleet.metrics_urls)) or all(
        counted(found[-1], "runs", a, p) - counted(scraped_before, "runs", a, p) == sums["runs"]
        for (a, p), sums in expected.items()), 10, "usage counters")
    for (agent, priority), sums in expected.items():
        for figure in names:
            delta = counted(found[-1], figure, agent, priority) - counted(scraped_before, figure, agent, priority)
            assert delta == pytest.approx(sums[figure], rel=1e-6, abs=1e-6), (agent, priority, figure)


def test_a_looping_agent_stops_at_its_token_budget_before_the_next_model_call(pfleet):
    looper = pfleet.client.agents["looper"]
    budget, loop = looper.budget.tokens, looper.steps[0]
    run = pfleet.client.wait(pfleet.client.submit("looper", LOOPER_QUESTION), timeout=60)
    assert run.status == "budget_exceeded" and run.budget_tokens == budget
    assert run.error["type"] == "BudgetExceeded" and f"token budget of {budget} spent" in run.error["message"]
    used = run.tokens_in + run.tokens_out
    assert used <= budget
    calls = [s for s in run.steps if s.model_s is not None]
    assert 2 <= len(calls) < loop.max_iterations  # it looped, and its budget stopped it, not the loop's bound
    assert all(s.status == "done" for s in calls)
    # It stopped at the next model step, before calling the model: nothing ran after.
    stopped = f"spin_think#{len(calls) + 1}"
    assert stopped in run.error["message"] and "leaves no room" in run.error["message"]
    assert run.steps[-1].key == stopped and run.steps[-1].status == "failed"
    assert run.steps[-1].model_s is None and run.steps[-1].tokens_in == run.steps[-1].tokens_out == 0

    # A submission's own budget overrides the agent's.
    bigger = pfleet.client.wait(pfleet.client.submit("looper", LOOPER_QUESTION, budget_tokens=budget * 2), timeout=60)
    assert bigger.status == "budget_exceeded" and bigger.budget_tokens == budget * 2
    assert used < bigger.tokens_in + bigger.tokens_out <= budget * 2


def test_a_model_call_is_clipped_to_what_its_budget_leaves(pfleet):
    client = pfleet.client
    step_max = client.agents["spender"].step("ramble").max_tokens
    budget = client.agents["spender"].budget.tokens
    cut = client.wait(client.submit("spender", {"topic": "queues"}), timeout=60)
    assert cut.status == "budget_exceeded"
    [ramble] = cut.steps
    # The call asked for no more than was left after its prompt, and got all of it: cut short.
    assert ramble.tokens_out < step_max and ramble.tokens_in + ramble.tokens_out <= budget
    assert f"clipped from {step_max} to {ramble.tokens_out}" in cut.error["message"]
    assert f"token budget of {budget} spent" in cut.error["message"]
    assert ramble.status == "failed" and ramble.cost > 0  # its output is not kept; its cost is counted

    whole = client.wait(client.submit("spender", {"topic": "queues"}, budget_tokens=1000), timeout=60)
    assert whole.status == "succeeded" and whole.steps[0].tokens_out == step_max

    by_cost = client.wait(client.submit("spender", {"topic": "queues"}, budget_tokens=1000, budget_cost=0.03),
                          timeout=60)
    assert by_cost.status == "budget_exceeded" and "cost budget of 0.03 spent" in by_cost.error["message"]
    assert 0 < by_cost.steps[0].tokens_out < ramble.tokens_out
    assert by_cost.cost <= 0.03


def _cli(fleet: Fleet, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.surfaces.cli", *args], env={**os.environ, **fleet.env},
                          capture_output=True, text=True, timeout=120, check=check)


def test_bad_budgets_are_refused_at_the_door(pfleet):
    r = pfleet.client.store.redis
    depth_before = [r.llen(q) for q in all_queues(pfleet.settings)]
    for kwargs, field_name in (({"budget_tokens": 0}, "budget_tokens"), ({"budget_tokens": 10**12}, "budget_tokens"),
                               ({"budget_cost": -1.0}, "budget_cost"), ({"budget_cost": float("nan")}, "budget_cost"),
                               ({"budget_cost": float("inf")}, "budget_cost")):
        with pytest.raises(InvalidSubmission) as refused:
            pfleet.client.submit("calculator", {"question": "What is 1 + 1?"}, **kwargs)
        assert refused.value.field == field_name and field_name in str(refused.value)
    bad = _cli(pfleet, "submit", "calculator", "--input", '{"question": "1 + 1"}', "--budget-tokens", "0", "--json",
               check=False)
    assert bad.returncode == 2 and json.loads(bad.stdout)["field"] == "budget_tokens"
    assert [r.llen(q) for q in all_queues(pfleet.settings)] == depth_before  # nothing was queued


def test_the_timeline_names_every_step_and_usage_prints_the_figures(pfleet):
    done = _cli(pfleet, "submit", "solver", "--input", '{"question": "What is (17 + 4) * 3?"}', "--wait", "--json")
    run = json.loads(done.stdout)
    keys = [s["key"] for s in run["steps"]]
    assert run["status"] == "succeeded" and keys[:2] == ["solve_think#1", "solve_act#1"] and len(keys) >= 3
    assert [s["key"] for s in run["timeline"]["steps"]] == keys
    assert run["timeline"]["tokens_out"] == run["tokens_out"] and run["cost"] == pytest.approx(run["timeline"]["cost"])

    text = _cli(pfleet, "runs", "show", run["id"], "--timeline").stdout
    lines = text.splitlines()
    for key in keys:  # a row per step, with its bar
        [row] = [line for line in lines if line.startswith(f"{key} ")]
        assert "|" in row and any(mark in row for mark in "░▒█▓·")
    think = next(line for line in lines if line.startswith("solve_think#1 "))
    act = next(line for line in lines if line.startswith("solve_act#1 "))
    assert "█" in think and "▓" in act  # generation in the model step, tool time in the tool step
    assert "legend:" in text and "total: queue" in text and "result: The answer is 63." in text

    usage = json.loads(_cli(pfleet, "usage", "--by", "agent", "--since", "1h", "--json").stdout)
    assert usage == json.loads(pfleet.client.usage("agent", 3600).model_dump_json()) | {
        "end": usage["end"], "start": usage["start"]}
    table = _cli(pfleet, "usage", "--by", "class").stdout
    assert "interactive" in table and "total" in table and "tokens in" in table
    assert _cli(pfleet, "usage", "--since", "soon", check=False).returncode == 2
