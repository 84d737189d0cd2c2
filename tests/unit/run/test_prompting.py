"""A step's prompt as messages: the agent's system text, the session's turns before the step's
message, a loop's earlier tool calls and results after it, the step's tools; stable from one
build to the next."""

from __future__ import annotations

import json

from fleet.run.agent import load_agents
from fleet.run.messages import Message, ToolCall, call_id
from fleet.run.prompting import build_prompt
from fleet.run.state import RunState

AGENTS = load_agents()


def _run(agent: str, input: dict, session: list | None = None, outputs: dict | None = None) -> RunState:
    """A run hash as Redis holds it, with ``outputs`` committed (by step key)."""
    raw = {"id": "r1", "agent": agent, "priority": "interactive", "status": "running", "created_at": "1",
           "deadline_at": "2", "input": json.dumps(input)}
    if session is not None:
        raw["session_id"], raw["session"] = "s1", json.dumps(session)
    for key, value in (outputs or {}).items():
        raw[f"out:{key}"] = json.dumps(value)
    return RunState(raw)


def test_a_loop_iteration_carries_the_earlier_calls_and_results_after_the_question():
    solver = AGENTS["solver"]
    run = _run("solver", {"question": "What is (17 + 4) * 3?"},
               outputs={"solve_think#1": {"tool": "calculator", "input": "(17 + 4) * 3"}, "solve_act#1": 63})
    prompt = build_prompt(solver, solver.step("solve_think"), run, iteration=2)
    first = call_id("r1", "solve_think#1")
    assert prompt.system == solver.system and prompt.user == "Solve the question.\nQuestion: What is (17 + 4) * 3?"
    assert prompt.after == (Message("assistant", tool_calls=(ToolCall(first, "calculator", {"expression": "(17 + 4) * 3"}),)),
                            Message("tool", "63", tool_call_id=first))
    assert [t.name for t in prompt.tools] == ["calculator", "word_count"]
    assert [m.role for m in prompt.messages()] == ["system", "user", "assistant", "tool"]
    assert build_prompt(solver, solver.step("solve_think"), run, iteration=2) == prompt  # the same every time
    assert build_prompt(solver, solver.step("solve_think"), run, iteration=1).after == ()


def test_a_sessions_turns_come_before_the_steps_message():
    chat = AGENTS["chat"]
    turns = [{"run_id": "a", "input": {"message": "My name is Ada."}, "result": "Nice to meet you."}]
    prompt = build_prompt(chat, chat.step("reply"), _run("chat", {"message": "What is my name?"}, session=turns))
    assert prompt.history == (Message("user", "My name is Ada."), Message("assistant", "Nice to meet you."))
    assert prompt.user == "What is my name?" and not prompt.history_placed


def test_a_template_that_places_its_transcript_keeps_it_out_of_chat_messages():
    from fleet.run.agent import parse_agent
    from fleet.run.tools import TOOLS

    agent = parse_agent({"name": "old", "result": "reply", "inputs": {"message": {}}, "example": {"message": "x"},
                         "steps": [{"name": "reply", "kind": "llm",
                                    "prompt": "{session.transcript}\nUser: {input.message}"}]}, set(TOOLS))
    turns = [{"run_id": "a", "input": {"message": "hi"}, "result": "hello"}]
    prompt = build_prompt(agent, agent.step("reply"), _run("old", {"message": "again"}, session=turns))
    assert prompt.history_placed and prompt.user == "User: hi\nAgent: hello\nUser: again"
    assert prompt.messages()[-1] == Message("user", "\nUser: again")  # the chat format's message: no transcript
