"""The rules of a step's life that need no server: guards, the retry policy, the next-step
rule and the rule that ends an event follow."""

from __future__ import annotations

import json
import random
import time

import pytest

from fleet.errors import DeadlineExceeded, PermanentError, TransientError
from fleet.keys import Keys
from fleet.run.agent import load_agents
from fleet.run.follow import Ended, Event, Follow, Gone, Read, Statuses, is_end
from fleet.run.plan import Exhausted, Finished, StepPos, is_skipped, next_step
from fleet.run.records import StepRecord
from fleet.run.state import RunState
from fleet.steps.context import Delivery, StepContext, StopStep
from fleet.steps.hooks.guards import POISON_MAX_DELIVERIES, DeadlineGuard, KnownStepGuard, PoisonGuard, TerminalGuard
from fleet.steps.retries import RetryPolicy

AGENTS = load_agents()


def _state(agent: str, status: str = "running", deadline_in_s: float = 60.0, **outputs: object) -> RunState:
    """A run hash as Redis holds it, with ``outputs`` (by step key) committed as done."""
    raw = {
        "id": "r1", "agent": agent, "priority": "interactive", "status": status,
        "created_at": repr(time.time()), "deadline_at": repr(time.time() + deadline_in_s),
        "input": json.dumps({"question": "q"}),
    }
    for key, value in outputs.items():
        name, _, it = key.partition("#")
        raw[f"out:{key}"] = json.dumps(value)
        raw[f"step:{key}"] = StepRecord(key=key, name=name, iteration=int(it or 0), status="done").model_dump_json()
    return RunState(raw)


def _ctx(run: RunState, step: str = "plan", deliveries: int = 1) -> StepContext:
    agent = AGENTS.get(run.agent)
    ctx = StepContext(delivery=Delivery(run.id, step, 0), run=run, agent=agent, key=step,
                      deliveries=deliveries)
    if agent is not None:
        try:
            ctx.step = agent.step(step)
        except KeyError:
            ctx.step = None
    return ctx


# --- guards ------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["succeeded", "failed", "dead_lettered", "cancelled", "expired", "budget_exceeded"])
def test_terminal_guard_stops_every_step_of_an_ended_run(status):
    with pytest.raises(StopStep, match=status):
        TerminalGuard().check(_ctx(_state("calculator", status)))


def test_terminal_guard_lets_a_live_run_go_on():
    TerminalGuard().check(_ctx(_state("calculator", "queued")))
    TerminalGuard().check(_ctx(_state("calculator", "running")))


def test_known_step_guard_dead_letters_unknown_agents_and_steps():
    with pytest.raises(PermanentError, match="unknown agent 'ghost'"):
        KnownStepGuard().check(_ctx(_state("ghost")))
    with pytest.raises(PermanentError, match="has no step 'nope'"):
        KnownStepGuard().check(_ctx(_state("calculator"), step="nope"))
    KnownStepGuard().check(_ctx(_state("calculator"), step="act"))


def test_deadline_guard_refuses_a_step_past_its_deadline_unless_it_is_already_done():
    with pytest.raises(DeadlineExceeded):
        DeadlineGuard().check(_ctx(_state("calculator", deadline_in_s=-1)))
    DeadlineGuard().check(_ctx(_state("calculator", deadline_in_s=30)))
    # A redelivered step whose output is committed only advances: no work, no expiry.
    DeadlineGuard().check(_ctx(_state("calculator", deadline_in_s=-1, plan={"tool": "x", "input": "1"})))


def test_poison_guard_counts_deliveries_that_never_finished():
    run = _state("calculator")
    for n in range(1, POISON_MAX_DELIVERIES + 1):
        PoisonGuard().check_started(_ctx(run, deliveries=n))
    with pytest.raises(PermanentError, match="keeps killing its worker"):
        PoisonGuard().check_started(_ctx(run, deliveries=POISON_MAX_DELIVERIES + 1))


# --- the retry policy --------------------------------------------------------------------
def test_retry_policy_backs_off_exponentially_below_its_cap_with_full_jitter():
    policy = RetryPolicy(max_attempts=10, backoff_base_s=0.5, backoff_max_s=4.0, jitter=False)
    assert [policy.backoff_s(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    jittered = RetryPolicy(max_attempts=10, backoff_base_s=0.5, backoff_max_s=4.0)
    rng = random.Random(7)
    draws = [jittered.backoff_s(3, rng) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in draws)
    assert max(draws) - min(draws) > 1.0  # spread out, not one value


def test_retry_policy_retries_transient_errors_only_within_attempts_and_deadline():
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.5, backoff_max_s=1.0, jitter=False)
    now = 1000.0
    assert policy.countdown_s(TransientError("down"), 1, now, now + 60) == 0.5
    assert policy.countdown_s(TransientError("down"), 2, now, now + 60) == 1.0
    assert policy.countdown_s(TransientError("down"), 3, now, now + 60) is None  # attempts spent
    assert policy.countdown_s(TransientError("down"), 1, now, now + 0.4) is None  # past the deadline
    assert policy.countdown_s(PermanentError("bad"), 1, now, now + 60) is None  # permanent
    assert policy.countdown_s(ValueError("bug"), 1, now, now + 60) is None  # a bug is not retried


# --- the next-step rule ------------------------------------------------------------------
def test_next_step_walks_a_linear_agent_in_definition_order():
    calc = AGENTS["calculator"]
    assert next_step(calc, _state("calculator")) == StepPos("plan")
    assert next_step(calc, _state("calculator", plan={"tool": "calculator", "input": "1"})) == StepPos("act")
    done = _state("calculator", plan={"tool": "calculator", "input": "1"}, act="1", answer="one")
    assert isinstance(next_step(calc, done), Finished)


def test_next_step_goes_round_a_loop_until_a_final_answer_or_its_bound():
    solver = AGENTS["solver"]
    call = {"tool": "calculator", "input": "1+1"}
    assert next_step(solver, _state("solver")) == StepPos("solve_think", 1)
    assert next_step(solver, _state("solver", **{"solve_think#1": call})) == StepPos("solve_act", 1)
    assert next_step(solver, _state("solver", **{"solve_think#1": call, "solve_act#1": "2"})) == StepPos("solve_think", 2)
    final = _state("solver", **{"solve_think#1": call, "solve_act#1": "2", "solve_think#2": {"final": "2"},
                                 "solve_act#2": None})
    assert isinstance(next_step(solver, final), Finished)
    rounds = {f"solve_think#{i}": call for i in range(1, 5)} | {f"solve_act#{i}": "2" for i in range(1, 5)}
    exhausted = next_step(solver, _state("solver", **rounds))
    assert isinstance(exhausted, Exhausted) and "max_iterations=4" in exhausted.message


def test_body_steps_after_the_final_answer_are_skipped():
    solver = AGENTS["solver"]
    final = _state("solver", **{"solve_think#2": {"final": "2"}})
    assert is_skipped(solver, final, StepPos("solve_act", 2))
    assert not is_skipped(solver, final, StepPos("solve_think", 2))
    assert not is_skipped(solver, _state("solver", **{"solve_think#2": {"tool": "x", "input": "1"}}),
                          StepPos("solve_act", 2))


# --- the follow end rule -----------------------------------------------------------------
KEYS = Keys("t")


def _drive(protocol, replies):
    """Run a follow protocol against scripted replies; return what it found."""
    found, reply, ops = [], None, []
    try:
        while True:
            item = protocol.send(reply)
            if isinstance(item, (Read, Statuses)):
                ops.append(item)
                reply = replies.pop(0)
            else:
                found.append(item)
                reply = None
    except StopIteration:
        pass
    return found, ops


def _events(run_id, *entries):
    return [(KEYS.events(run_id), list(entries))]


def test_a_terminal_event_ends_a_follow_only_while_the_status_still_says_so():
    assert is_end({"type": "status", "status": "succeeded"})
    assert is_end({"type": "status", "status": "budget_exceeded"})
    assert not is_end({"type": "status", "status": "running"})
    assert not is_end({"type": "step", "status": "done"})
    # A replayed run: its history holds an earlier end, but it is queued again.
    follow = Follow(KEYS)
    follow.add("r1")
    found, _ = _drive(follow.round(), [
        _events("r1", ("1-0", {"type": "status", "status": "dead_lettered"}),
                ("2-0", {"type": "status", "status": "queued"})),
        ["queued"],
    ])
    assert [type(f) for f in found] == [Event, Event] and "r1" in follow.cursors
    found, _ = _drive(follow.round(), [_events("r1", ("3-0", {"type": "status", "status": "succeeded"})),
                                       ["succeeded"]])
    assert [type(f) for f in found] == [Event, Ended] and "r1" not in follow.cursors


def test_a_quiet_follow_checks_statuses_drains_the_end_and_reports_gone_runs():
    follow = Follow(KEYS)
    follow.add("done", "5-0")
    follow.add("gone")
    found, ops = _drive(follow.round(), [
        None,  # nothing new
        ["succeeded", None],
        _events("done", ("6-0", {"type": "status", "status": "succeeded"})),
    ])
    assert ops[0].block_ms is None  # the first read after adding a run does not block
    assert [(type(f).__name__, f.run_id) for f in found] == [("Gone", "gone"), ("Event", "done"), ("Ended", "done")]
    assert follow.cursors == {}


def test_a_follow_with_a_timeout_stops_without_an_end():
    follow = Follow(KEYS)
    found, ops = _drive(follow.until_end("r1", timeout_s=0.0), [])
    assert found == [] and ops == [] and follow.cursors == {}
    assert Gone("x") != Ended("x")
