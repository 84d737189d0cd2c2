"""Chains from definitions, tool-call parsing, the state a step sees, templates."""

from __future__ import annotations

import json

import pytest

from fleet.broker.app import create_app
from fleet.broker.chains import build_chain
from fleet.errors import PermanentError
from fleet.run.agent import load_agents, parse_agent
from fleet.run.plan import remaining_steps
from fleet.run.state import RunState
from fleet.run.template import render
from fleet.run.tools import TOOLS
from fleet.run.view import template_view
from fleet.settings import Settings

AGENTS = load_agents()
SETTINGS = Settings(_env_file=None, queue_prefix="x.")


def test_chain_routes_each_step_by_kind_and_class():
    app = create_app(SETTINGS)
    c = build_chain(app, SETTINGS, AGENTS["calculator"], "r1", "batch")
    assert [(t.task, t.options["queue"], t.options["shadow"]) for t in c.tasks] == [
        ("fleet.llm", "x.llm.batch", "calculator.plan"),
        ("fleet.tool", "x.tool.batch", "calculator.act"),
        ("fleet.llm", "x.llm.batch", "calculator.answer"),
    ]
    assert all(t.immutable for t in c.tasks)
    assert json.loads(json.dumps(c.tasks[0].kwargs)) == {"run_id": "r1", "step": "plan", "iteration": 0}


def test_a_loop_contributes_one_iteration_and_replays_start_mid_chain():
    solver = AGENTS["solver"]
    assert [(s.name, it) for s, it in remaining_steps(solver)] == [("solve_think", 1), ("solve_act", 1)]
    assert [(s.name, it) for s, it in remaining_steps(solver, "solve_act", 3)] == [("solve_act", 3)]
    writer = AGENTS["writer"]
    assert [s.name for s, _ in remaining_steps(writer, "critique")] == ["critique", "revise"]
    with pytest.raises(KeyError):
        remaining_steps(writer, "nope")


def test_state_view_builds_the_loop_transcript_for_templates_that_place_it():
    looper = parse_agent({
        "name": "labelled", "result": "think.final", "inputs": {"question": {}}, "example": {"question": "q"},
        "steps": [{"name": "round", "kind": "loop", "max_iterations": 3, "until": "think", "body": [
            {"name": "think", "kind": "llm", "transcript_label": "Action", "parse": "tool_call",
             "prompt": "{loop.transcript}\nQuestion: {input.question}"},
            {"name": "act", "kind": "tool", "transcript_label": "Observation", "tool_from": "think",
             "allowed_tools": ["calculator"]}]}]}, set(TOOLS))
    raw = {
        "id": "r1", "agent": "labelled", "priority": "interactive", "status": "running",
        "created_at": "1", "deadline_at": "2", "input": json.dumps({"question": "q"}),
        "out:think#1": json.dumps({"tool": "calculator", "input": "1+1"}),
        "out:act#1": json.dumps(2),
    }
    run = RunState(raw)
    view = template_view(run, 2, looper.loop_of("think"))
    assert view["loop"]["transcript"] == 'Action: {"input": "1+1", "tool": "calculator"}\nObservation: 2'
    assert view["steps"]["act"] == 2
    first = template_view(run, 1, looper.loop_of("think"))
    assert first["loop"]["transcript"] == ""


def test_render_substitutes_lookups_only():
    ctx = {"input": {"q": "{steps.secret}"}, "steps": {"a": {"b": 1}}}
    assert render("Q={input.q} B={steps.a.b}", ctx) == "Q={steps.secret} B=1"
    with pytest.raises(PermanentError, match="missing"):
        render("{steps.zzz}", ctx)
