"""Budgets and prices without a server: what a run's budget leaves, how a call is clipped,
the messages that name the budget, and budgets refused at the door and in agent files."""

from __future__ import annotations

import json
import time

import pytest

from fleet.errors import BudgetExceeded, InvalidSubmission
from fleet.run.agent import AgentDefinitionError, parse_agent
from fleet.run.budget import Allowance, allowance
from fleet.run.cost import Prices
from fleet.run.records import StepRecord
from fleet.run.state import RunState
from fleet.run.tools import TOOLS
from fleet.scheduling.submission import parse_submission

PRICES = Prices(per_1k_input_tokens=1.0, per_1k_output_tokens=2.0, per_gpu_s=0.5)


def _run(budget_tokens: int | None = None, budget_cost: float | None = None, *records: StepRecord) -> RunState:
    raw = {"id": "r1", "agent": "a", "priority": "batch", "status": "running", "created_at": repr(time.time()),
           "deadline_at": repr(time.time() + 60), "input": "{}"}
    if budget_tokens is not None:
        raw["budget_tokens"] = str(budget_tokens)
    if budget_cost is not None:
        raw["budget_cost"] = repr(budget_cost)
    for r in records:
        raw[f"step:{r.key}"] = r.model_dump_json()
        raw[f"out:{r.key}"] = json.dumps("x")
    return RunState(raw)


def _call(key: str, tokens_in: int, tokens_out: int, prompt_bytes: int = 0, cost: float = 0.0) -> StepRecord:
    return StepRecord(key=key, name=key, kind="llm", status="done", tokens_in=tokens_in, tokens_out=tokens_out,
                      prompt_bytes=prompt_bytes, model_s=0.1, cost=cost)


def test_prices_make_a_cost_and_say_how_much_output_a_cost_buys():
    assert PRICES.cost(1000, 500, 2.0) == pytest.approx(1.0 + 1.0 + 1.0)
    assert PRICES.output_tokens_for(0.1, tokens_in=50) == 25  # (0.1 - 0.05) / 0.002
    assert Prices(per_1k_input_tokens=1.0).output_tokens_for(0.1, 10) is None  # output is free: no clip by cost
    assert Prices().cost(10**6, 10**6, 100.0) == 0.0


def test_a_run_without_a_budget_has_no_allowance():
    assert allowance(_run(None, None, _call("a", 10**6, 10**6)), "b", PRICES) is None


def test_a_spent_budget_stops_the_next_model_call_naming_the_budget_and_the_step():
    with pytest.raises(BudgetExceeded, match=r"token budget of 100 spent \(100 used\) before step think#3"):
        allowance(_run(100, None, _call("think#1", 40, 10), _call("think#2", 40, 10)), "think#3", PRICES)
    with pytest.raises(BudgetExceeded, match=r"cost budget of 0.5 spent \(0.5 used\) before step b"):
        allowance(_run(None, 0.5, _call("a", 1, 1, cost=0.5)), "b", PRICES)
    left = allowance(_run(101, None, _call("think#1", 90, 10)), "think#2", PRICES)
    assert isinstance(left, Allowance) and left.tokens_used == 100


def test_a_call_is_clipped_to_what_is_left_after_its_prompt():
    left = allowance(_run(100, None, _call("a", 30, 10)), "b", PRICES)
    prompt = "x" * 40  # no earlier prompt to learn from: 4 bytes a token, plus 10%: 11
    assert left.estimate(prompt) == 11
    clip = left.clip(prompt, wanted=64)
    assert (clip.max_tokens, clip.wanted, clip.by) == (100 - 40 - 11, 64, "token budget of 100")
    assert left.clip(prompt, wanted=16).by is None and left.clip(prompt, wanted=16).max_tokens == 16
    clip.check(clip.max_tokens - 1)  # stopped on its own before the clip: a whole answer
    with pytest.raises(BudgetExceeded, match=r"token budget of 100 spent: step b's model call was cut at 49 tokens "
                                             r"\(max_tokens clipped from 64 to 49\)"):
        clip.check(49)
    with pytest.raises(BudgetExceeded, match=r"step b's prompt \(~66 tokens\) leaves no room for output"):
        left.clip("x" * 240, wanted=8)


def test_the_prompt_estimate_learns_the_models_count_from_the_runs_earlier_prompts():
    # The run's earlier prompts came to 8 bytes a token, as the model counted them.
    left = allowance(_run(1000, None, _call("a", 50, 5, prompt_bytes=400), _call("b", 30, 5, prompt_bytes=240)),
                     "c", PRICES)
    assert left.bytes_per_token == 8.0 and left.estimate("y" * 800) == 110


def test_a_cost_budget_clips_by_the_price_of_output():
    left = allowance(_run(None, 0.2, _call("a", 10, 10, cost=0.1)), "b", PRICES)
    clip = left.clip("z" * 40, wanted=200)  # 0.1 left, 11 prompt tokens at 0.001: (0.1 - 0.011) / 0.002
    assert (clip.max_tokens, clip.by) == (44, "cost budget of 0.2")
    both = allowance(_run(60, 0.2, _call("a", 10, 10, cost=0.1)), "b", PRICES).clip("z" * 40, wanted=200)
    assert (both.max_tokens, both.by) == (60 - 20 - 11, "token budget of 60")  # the tighter budget clips


@pytest.mark.parametrize(("field", "value"), [("budget_tokens", 0), ("budget_tokens", -5), ("budget_tokens", 2.5),
                                              ("budget_tokens", 10**10), ("budget_cost", 0), ("budget_cost", -1.0),
                                              ("budget_cost", float("nan")), ("budget_cost", float("inf"))])
def test_bad_budgets_are_refused_at_the_door_naming_the_field(field, value):
    with pytest.raises(InvalidSubmission) as refused:
        parse_submission({"agent": "calculator", "input": {}, field: value})
    assert refused.value.field == field and str(refused.value).startswith(f"{field}: ")


def test_an_agent_file_may_set_a_budget_and_a_bad_one_is_named():
    base = {"name": "b", "result": "s", "steps": [{"name": "s", "kind": "llm", "prompt": "hi"}]}
    agent = parse_agent({**base, "budget": {"tokens": 500, "cost": 0.25}}, set(TOOLS))
    assert (agent.budget.tokens, agent.budget.cost) == (500, 0.25)
    assert parse_agent(base, set(TOOLS)).budget.tokens is None
    with pytest.raises(AgentDefinitionError, match=r"agent 'b': budget.tokens: Input should be greater than 0"):
        parse_agent({**base, "budget": {"tokens": 0}}, set(TOOLS))
    with pytest.raises(AgentDefinitionError, match=r"agent 'b': budget.surprise"):
        parse_agent({**base, "budget": {"surprise": 1}}, set(TOOLS))
