"""Agent definitions: loading, validation errors that name the agent and the step."""

from __future__ import annotations

import copy

import pytest

from fleet.errors import InvalidSubmission
from fleet.run.agent import AgentDefinitionError, load_agents, parse_agent
from fleet.run.tools import TOOLS

BASE = {
    "name": "demo",
    "result": "answer",
    "inputs": {"question": {"type": "string", "max_length": 100}},
    "example": {"question": "What is 1 + 1?"},
    "steps": [
        {"name": "plan", "kind": "llm", "prompt": "Q: {input.question}", "parse": "tool_call"},
        {"name": "act", "kind": "tool", "tool_from": "plan", "allowed_tools": ["calculator"]},
        {"name": "answer", "kind": "llm", "prompt": "Observation: {steps.act}"},
    ],
}


def _parse(mutate) -> None:
    data = copy.deepcopy(BASE)
    mutate(data)
    parse_agent(data, set(TOOLS))


def test_builtin_agents_load_and_their_examples_validate():
    agents = load_agents()
    assert {"calculator", "writer", "solver"} <= set(agents)
    for agent in agents.values():
        assert agent.validate_input(agent.example)


def test_valid_definition_parses():
    agent = parse_agent(copy.deepcopy(BASE), set(TOOLS))
    assert [s.name for s, _ in agent.iter_steps()] == ["plan", "act", "answer"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["steps"][2].update(prompt="{steps.nope}"), "agent 'demo', step 'answer': template refers to unknown '{steps.nope}'"),
        (lambda d: d["steps"][0].update(prompt="{input.missing}"), "step 'plan'"),
        (lambda d: d["steps"][1].update(allowed_tools=["rm_rf"]), "agent 'demo', step 'act': unknown tool 'rm_rf'"),
        (lambda d: d["steps"][1].update(tool_from="answer"), "step 'act': tool_from must name an earlier llm step"),
        (lambda d: d["steps"][0].pop("prompt"), "agent 'demo', step 'plan': prompt"),
        (lambda d: d["steps"][2].update(max_tokens=0), "agent 'demo', step 'answer': max_tokens"),
        (lambda d: d["steps"].append({"name": "plan", "kind": "llm", "prompt": "x"}), "step 'plan': duplicate step name"),
        (lambda d: d.update(result="nowhere"), "result refers to unknown step 'nowhere'"),
        (lambda d: d.update(example={}), "example lacks input 'question'"),
        (lambda d: d["steps"][1].update(tool="calculator"), "step 'act'"),
        (lambda d: d["steps"][2].update(kind="shell"), "agent 'demo', step 'answer'"),
    ],
)
def test_invalid_definitions_name_agent_and_step(mutate, expected):
    with pytest.raises(AgentDefinitionError) as err:
        _parse(mutate)
    assert expected in str(err.value)


def test_loop_must_be_bounded_and_name_its_until_step():
    loop = {
        "name": "loop", "kind": "loop", "max_iterations": 3, "until": "think",
        "body": [
            {"name": "think", "kind": "llm", "prompt": "{input.question} {loop.transcript}", "parse": "tool_call"},
            {"name": "act", "kind": "tool", "tool_from": "think", "allowed_tools": ["calculator"]},
        ],
    }
    ok = {**copy.deepcopy(BASE), "steps": [copy.deepcopy(loop)], "result": "think.final"}
    agent = parse_agent(ok, set(TOOLS))
    assert agent.loop_of("act").name == "loop"
    unbounded = copy.deepcopy(ok)
    unbounded["steps"][0]["max_iterations"] = 10_000
    with pytest.raises(AgentDefinitionError, match="step 'loop': max_iterations"):
        parse_agent(unbounded, set(TOOLS))
    bad_until = copy.deepcopy(ok)
    bad_until["steps"][0]["until"] = "act"
    with pytest.raises(AgentDefinitionError, match="'until' must name an llm step"):
        parse_agent(bad_until, set(TOOLS))
    outside = copy.deepcopy(BASE)
    outside["steps"][2]["prompt"] = "{loop.transcript}"
    with pytest.raises(AgentDefinitionError, match="unknown '{loop.transcript}'"):
        parse_agent(outside, set(TOOLS))


def test_input_validation_names_the_field():
    agent = parse_agent(copy.deepcopy(BASE), set(TOOLS))
    with pytest.raises(InvalidSubmission) as err:
        agent.validate_input({"question": "x" * 101})
    assert err.value.field == "input.question"
    with pytest.raises(InvalidSubmission) as extra:
        agent.validate_input({"question": "ok", "shell": "rm -rf /"})
    assert extra.value.field == "input.shell"
    with pytest.raises(InvalidSubmission) as missing:
        agent.validate_input({})
    assert missing.value.field == "input.question"
    with pytest.raises(InvalidSubmission):
        agent.validate_input(["not", "an", "object"])
