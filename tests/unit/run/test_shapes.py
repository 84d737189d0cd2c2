"""Parallel and wait steps without a server: definitions, the next-step rule, what is sent."""

from __future__ import annotations

import json
import time

import pytest

from fleet.broker.app import create_app
from fleet.broker.chains import Fanout, build_chain
from fleet.inference.formats import TextFormat
from fleet.run.agent import AgentDefinitionError, load_agents, parse_agent
from fleet.run.plan import StepPos, branch_count, branch_view, next_branch, next_step, pending_branches, remaining_steps
from fleet.run.records import StepRecord
from fleet.run.state import RunState
from fleet.run.tools import TOOLS
from fleet.run.view import template_view
from fleet.settings import Settings

AGENTS = load_agents()
SETTINGS = Settings(_env_file=None, queue_prefix="x.")


def _state(agent: str, **outputs: object) -> RunState:
    raw = {"id": "r1", "agent": agent, "priority": "interactive", "status": "running",
           "created_at": repr(time.time()), "deadline_at": repr(time.time() + 60), "input": json.dumps({})}
    for key, value in outputs.items():
        name, _, it = key.partition("#")
        raw[f"out:{key}"] = json.dumps(value)
        raw[f"step:{key}"] = StepRecord(key=key, name=name, iteration=int(it or 0), status="done").model_dump_json()
    return RunState(raw)


def test_a_map_runs_one_branch_per_item_at_most_max_concurrency_at_first():
    fan = AGENTS["fanout"]
    top = fan.shaped("summarize")
    items = [f"item {i}" for i in range(11)]
    run = _state("fanout", split=items)
    assert next_step(fan, run) == StepPos("summarize")
    assert branch_count(top, run) == 11
    assert pending_branches(top, run) == list(range(1, 9))
    # each commit beyond sends the next branch once: counts 1..3 send 9..11, later counts nothing
    assert [next_branch(top, run, c) for c in (1, 2, 3, 4)] == [9, 10, 11, None]
    assert branch_view(top, run, 3)["branch"] == {"index": 3, "item": "item 2"}
    assert fan.step_at("summarize", 5).name == "summary"
    done = _state("fanout", split=items, **{"summarize#1": "a", "summarize#2": "b"})
    assert pending_branches(top, done)[:2] == [3, 4]
    joined = _state("fanout", split=items, summarize=["a"] * 11)
    assert next_step(fan, joined) == StepPos("combine")
    assert template_view(joined)["steps"]["summarize"] == ["a"] * 11  # the join, not a branch


def test_chains_stop_before_a_parallel_step_which_travels_as_its_branches():
    app = create_app(SETTINGS)
    fan = AGENTS["fanout"]
    assert [s.name for s, _ in remaining_steps(fan)] == ["split"]
    assert [s.name for s, _ in remaining_steps(fan, "combine")] == ["combine"]
    sent = build_chain(app, SETTINGS, fan, "r1", "interactive", start="summarize",
                       run=_state("fanout", split=["a", "b", "c"]))
    assert isinstance(sent, Fanout)
    assert [(s.task, s.options["queue"], s.kwargs["iteration"]) for s in sent.signatures] == [
        ("fleet.llm", "x.llm.interactive", 1), ("fleet.llm", "x.llm.interactive", 2),
        ("fleet.llm", "x.llm.interactive", 3)]
    one = build_chain(app, SETTINGS, fan, "r1", "interactive", start="summarize", iteration=9)
    assert [s.kwargs for s in one.signatures] == [{"run_id": "r1", "step": "summarize", "iteration": 9}]


def test_several_tool_calls_in_one_reply_become_a_list_the_map_runs_over():
    form = TextFormat()
    text = json.dumps([{"tool": "calculator", "input": "2 + 3"}, {"tool": "calculator", "input": "4 * 5"}])
    assert form.parse_tool_calls(text) == {"calls": [{"tool": "calculator", "input": "2 + 3"},
                                                     {"tool": "calculator", "input": "4 * 5"}]}
    assert form.parse_tool_calls('{"tool": "calculator", "input": "1+1"}') == {
        "calls": [{"tool": "calculator", "input": "1+1"}]}
    assert form.parse_tool_calls("The answer is 5.") == {"final": "The answer is 5."}
    multi = AGENTS["multicalc"]
    run = _state("multicalc", plan={"final": "no tools needed"})
    assert branch_count(multi.shaped("act"), run) == 0  # an empty map: joined at once, nothing sent


def test_fixed_branches_and_waits_are_validated():
    tools = set(TOOLS)
    base = {"name": "x", "result": "fan", "steps": [
        {"name": "first", "kind": "tool", "tool": "reverse", "input": "a"},
        {"name": "fan", "kind": "parallel", "branches": [
            {"name": "a", "kind": "tool", "tool": "reverse", "input": "{steps.first}"},
            {"name": "b", "kind": "llm", "prompt": "Say {branch.index}"}]}]}
    agent = parse_agent(base, tools)
    assert agent.shaped("fan").branch_names == ["a", "b"]
    with pytest.raises(AgentDefinitionError, match="exactly one of 'branches' and 'over'"):
        parse_agent({**base, "steps": [base["steps"][0], {"name": "fan", "kind": "parallel"}]}, tools)
    with pytest.raises(AgentDefinitionError, match="'over' must name an earlier step"):
        parse_agent({**base, "steps": [base["steps"][0], {
            "name": "fan", "kind": "parallel", "over": "nope",
            "branch": {"name": "a", "kind": "tool", "tool": "reverse", "input": "{branch.item}"}}]}, tools)
    with pytest.raises(AgentDefinitionError, match="first step"):
        parse_agent({"name": "w", "result": "w", "steps": [{"name": "w", "kind": "wait", "signal": "go"}]}, tools)
    approval = AGENTS["approval"]
    assert next_step(approval, _state("approval", draft="d")) == StepPos("approval")
    assert next_step(approval, _state("approval", draft="d", approval={"note": "ok"})) == StepPos("finalize")
    assert [s.name for s, _ in remaining_steps(approval)] == ["draft"]
