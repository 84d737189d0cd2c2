"""Agent runs end to end: real Redis, real Triton (dev model), real worker processes."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from fleet.broker.queues import BINDING_SEP, all_queues, binding_key
from fleet.errors import InvalidSubmission, RunNotFound
from tests.support.dev_engine import engine

generate = engine.generate
from fleet.inference.formats import TextFormat
from fleet.inference.triton import TritonClient
from fleet.run.prompting import build_prompt
from fleet.run.view import template_view
from tests.support.waiting import wait_until

from .conftest import model_metrics

pytestmark = pytest.mark.integration


def _sim_text(prompt: str, max_tokens: int) -> str:
    tokens, _ = generate(prompt, {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0})
    return "".join(tokens).strip()


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_calculator_agent_uses_the_tool_the_model_chose(fleet, priority):
    run_id = fleet.client.submit("calculator", {"question": "What is 12 * 7 + 3?"}, priority=priority)
    run = fleet.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    assert run.outputs["plan"] == {"tool": "calculator", "input": "12 * 7 + 3"}
    assert run.outputs["act"] == 87
    assert run.result == "The answer is 87."
    assert [s.key for s in run.steps] == ["plan", "act", "answer"]
    assert all(s.status == "done" and s.attempts == 1 for s in run.steps)
    llm = [s for s in run.steps if s.name != "act"]
    assert all(s.tokens_in > 0 and s.tokens_out > 0 for s in llm)
    # Interactive calls stream (time to first token measured); batch calls take one response.
    assert all((s.ttft_s is not None) == (priority == "interactive") for s in llm)


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_writer_agent_drafts_critiques_and_revises(fleet, priority):
    topic = f"backpressure in {priority} queues"
    run_id = fleet.client.submit("writer", {"topic": topic}, priority=priority)
    run = fleet.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    # Recompute every step from the simulator's pure text function: the fleet must have
    # rendered each prompt (in the dev model's text layout) from the previous steps' outputs.
    agent = fleet.client.agents["writer"]
    system = "You write short, plain prose for engineers."
    draft = _sim_text(f"{system}\nUser: Topic: {topic}\nWrite a short paragraph about the topic.\nAgent:", 48)
    state = fleet.client.store.load(run_id)
    critique = _sim_text(TextFormat().render(build_prompt(agent, agent.step("critique"), state)).text, 24)
    revised = _sim_text(TextFormat().render(build_prompt(agent, agent.step("revise"), state)).text, 48)
    critique_prompt = TextFormat().render(build_prompt(agent, agent.step("critique"), state)).text
    assert critique_prompt == f"{system}\nUser: Topic: {topic}\nDraft: {draft}\nCritique this draft in two sentences.\nAgent:"
    # Laid out for the prefix cache: the revision's prompt starts with the critique's, less its last lines.
    revise_prompt = TextFormat().render(build_prompt(agent, agent.step("revise"), state)).text
    assert revise_prompt.startswith(critique_prompt.rsplit("\n", 2)[0] + "\n")
    assert run.outputs["draft"] == draft
    assert run.outputs["critique"] == critique
    assert run.result == revised
    assert len(revised.split()) == 48
    assert [s.tokens_out for s in run.steps] == [48, 24, 48]


@pytest.mark.parametrize("priority", ["interactive", "batch"])
def test_solver_agent_loops_until_the_model_answers(fleet, priority):
    run_id = fleet.client.submit("solver", {"question": "What is (17 + 4) * 3?"}, priority=priority)
    run = fleet.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    assert run.result == "The answer is 63."
    assert [s.key for s in run.steps] == ["solve_think#1", "solve_act#1", "solve_think#2", "solve_act#2"]
    assert run.outputs["solve_act#1"] == 63
    assert [s.status for s in run.steps] == ["done", "done", "done", "skipped"]


def test_tokens_stream_in_order(fleet):
    run_id = fleet.client.submit("writer", {"topic": "streams"}, stream=True)
    events = list(fleet.client.events(run_id, timeout=60))
    run = fleet.client.get(run_id)
    assert run.status == "succeeded"
    for step in ("draft", "critique", "revise"):
        tokens = [e["text"] for e in events if e["type"] == "token" and e["step"] == step]
        assert len(tokens) == run.steps[[s.key for s in run.steps].index(step)].tokens_out
        assert "".join(tokens).strip() == run.outputs[step]
    # Step order in the stream: every token of a step comes after its "running" event
    # and before its "done" event, and steps do not interleave.
    kinds = [(e["type"], e.get("step"), e.get("status")) for e in events]
    first_critique = kinds.index(("step", "critique", "running"))
    assert all(k[1] != "draft" for k in kinds[first_critique:])
    assert kinds[-1] == ("status", None, "succeeded")


def test_invalid_input_is_rejected_naming_the_field(fleet):
    r = fleet.client.store.redis
    depth_before = [r.llen(q) for q in all_queues(fleet.settings)]
    records_before = len(list(r.scan_iter(fleet.settings.key("run", "*"), count=1000)))
    with pytest.raises(InvalidSubmission) as missing:
        fleet.client.submit("calculator", {"questoin": "What is 1 + 1?"})
    assert missing.value.field is not None and "question" in str(missing.value)
    with pytest.raises(InvalidSubmission) as too_long:
        fleet.client.submit("calculator", {"question": "x" * 2001})
    assert too_long.value.field == "input.question"
    with pytest.raises(InvalidSubmission) as wrong_type:
        fleet.client.submit("calculator", {"question": ["not", "a", "string"]})
    assert wrong_type.value.field == "input.question"
    with pytest.raises(InvalidSubmission) as unknown:
        fleet.client.submit("no_such_agent", {})
    assert unknown.value.field == "agent" and "calculator" in str(unknown.value)
    with pytest.raises(InvalidSubmission) as bad_priority:
        fleet.client.submit("calculator", {"question": "1+1"}, priority="urgent")  # type: ignore[arg-type]
    assert bad_priority.value.field == "priority"
    # Nothing was queued and no run record was left behind.
    assert [r.llen(q) for q in all_queues(fleet.settings)] == depth_before
    assert len(list(r.scan_iter(fleet.settings.key("run", "*"), count=1000))) == records_before


def test_idempotency_key_returns_the_same_run(fleet):
    first = fleet.client.submit("calculator", {"question": "What is 2 + 2?"}, idempotency_key="same-key")
    second = fleet.client.submit("calculator", {"question": "What is 2 + 2?"}, idempotency_key="same-key")
    assert first == second
    assert fleet.client.wait(first, timeout=60).result == "The answer is 4."


def test_unknown_run_is_not_found(fleet):
    with pytest.raises(RunNotFound):
        fleet.client.get("0" * 32)


def test_concurrent_requests_are_batched_by_the_model(fleet, triton):
    client = TritonClient(triton.grpc_url)
    sampling = {"max_tokens": 32}
    n = 8

    def one(i: int) -> None:
        gen = client.generate(f"batching probe {i}", sampling, model="medium_sim", priority=1, timeout_s=30)
        assert gen.tokens_out == 32

    one(-1)  # warm the channel and the model's metadata
    before = model_metrics(triton.metrics_url)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    after = model_metrics(triton.metrics_url, done=before["vllm:request_success_total"] + n)
    client.close()
    steps = after["medium_sim:engine_steps_total"] - before["medium_sim:engine_steps_total"]
    # Counted by the model itself: served one after another the 8 requests would take 8 x 32
    # decode steps; sharing steps they take a little over 32, however loaded the machine.
    assert steps < n * 32 / 2, (steps, after)
    assert after["medium_sim:num_requests_running_max"] >= 2


def test_run_record_keeps_timing_and_tokens(fleet):
    run_id = fleet.client.submit("calculator", {"question": "How many words are in this sentence?"})
    run = fleet.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    assert run.outputs["plan"]["tool"] == "word_count"
    assert run.latency_s is not None and run.latency_s > 0
    assert run.started_at is not None and run.created_at <= run.started_at <= run.finished_at
    for step in run.steps:
        assert step.duration_s is not None and step.duration_s >= 0
        assert step.worker
    ttl = fleet.client.store.redis.ttl(fleet.client.store.run_key(run_id))
    assert 0 < ttl <= fleet.settings.result_ttl_s


def test_state_view_matches_what_steps_saw(fleet):
    run_id = fleet.client.submit("calculator", {"question": "What is 6 * 7?"})
    run = fleet.client.wait(run_id, timeout=60)
    state = fleet.client.store.load(run_id)
    view = template_view(state, 0, fleet.client.agents["calculator"].loop_of("answer"))
    assert view["steps"]["act"] == 42
    assert state.input == {"question": "What is 6 * 7?"}
    assert run.result == "The answer is 42."


def test_a_two_turn_session_sees_the_earlier_turn(fleet):
    first = fleet.client.submit("chat", {"message": "My name is Ada."}, session_id="s-ada")
    run1 = fleet.client.wait(first, timeout=30)
    assert run1.status == "succeeded" and run1.session == []
    second = fleet.client.submit("chat", {"message": "What is my name?"}, session_id="s-ada")
    run2 = fleet.client.wait(second, timeout=30)
    assert run2.status == "succeeded"
    assert run2.session == [{"run_id": first, "input": {"message": "My name is Ada."}, "result": run1.result}]
    system = fleet.client.agents["chat"].system
    prompt = f"{system}\nUser: My name is Ada.\nAgent: {run1.result}\nUser: What is my name?\nAgent:"
    assert run2.result == _sim_text(prompt, 24)
    other = fleet.client.wait(fleet.client.submit("chat", {"message": "What is my name?"}), timeout=30)
    assert other.result == _sim_text(f"{system}\nUser: What is my name?\nAgent:", 24) != run2.result


def _next_event(fleet, run_id: str, match, timeout: float = 10.0) -> dict:
    """Block on the run's event stream (from its start) until an event matches."""
    r, key, last = fleet.client.store.redis, fleet.client.store.events_key(run_id), "0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, rows in r.xread({key: last}, block=500) or []:
            for last, event in rows:
                if match(event):
                    return event
    raise AssertionError(f"run {run_id}: no matching event in {timeout}s")


def test_cancel_mid_generation_stops_the_model_call(fleet, triton):
    cancelled_before = model_metrics(triton.metrics_url)["medium_sim:requests_cancelled_total"]
    run_id = fleet.client.submit("slow", {"topic": "a very long essay"}, stream=True)
    tokens = 0
    for event in fleet.client.events(run_id, timeout=30):
        tokens += event["type"] == "token"
        if tokens == 5:
            break
    assert fleet.client.cancel(run_id) is True
    assert fleet.client.wait(run_id, timeout=10).status == "cancelled"
    # The worker sees the cancel while tokens stream, cancels the Triton request and fails the step.
    failed = _next_event(fleet, run_id, lambda e: e["type"] == "step" and e.get("status") == "failed")
    assert failed["step"] == "ramble" and "RunCancelled" in failed["error"]
    run = fleet.client.get(run_id)
    assert "after" not in run.outputs and "ramble" not in run.outputs
    # The model itself dropped the sequence (counted by the model, not timed here), long
    # before the 2000 tokens asked for.
    streamed = [e for _, e in fleet.client.store.redis.xrange(fleet.client.store.events_key(run_id)) if e["type"] == "token"]
    assert len(streamed) < 1000
    wait_until(lambda: model_metrics(triton.metrics_url)["medium_sim:requests_cancelled_total"] > cancelled_before,
               10, "the model seeing the cancel")
    assert fleet.client.cancel(run_id) is False  # already ended


def test_cancel_reaches_a_batch_model_call_that_streams_nothing(fleet):
    # Batch calls take one response (no tokens to poll between): the cancel must reach the
    # call in flight through the workers' cancel channel.
    run_id = fleet.client.submit("slow", {"topic": "a long batch essay"}, priority="batch")
    _next_event(fleet, run_id, lambda e: e["type"] == "step" and e.get("status") == "running")
    assert fleet.client.cancel(run_id) is True
    failed = _next_event(fleet, run_id, lambda e: e["type"] == "step" and e.get("status") in ("failed", "done"))
    # Cancelled mid-call: the step failed instead of finishing its 2000 tokens.
    assert failed["status"] == "failed" and "RunCancelled" in failed["error"]
    run = fleet.client.get(run_id)
    assert run.status == "cancelled" and "ramble" not in run.outputs


def test_each_queue_is_bound_to_its_own_exchange_alone(fleet):
    # Read from Redis, where kombu keeps an exchange's bindings: the workers declared every queue
    # with its own exchange and routing key, so a publish by exchange reaches one queue.
    r = fleet.client.store.redis
    for queue in all_queues(fleet.settings):
        assert [m.split(BINDING_SEP) for m in r.smembers(binding_key(queue))] == [[queue, "", queue]]


def test_a_turn_is_in_its_session_once_whenever_its_runs_end_is_seen(fleet):
    from fleet.run.sessions import Sessions

    session = f"s-{uuid.uuid4().hex[:6]}"
    sessions = Sessions(fleet.settings, fleet.client.store.redis)
    seen_at_end = []
    for k in range(5):  # each turn sent the moment the last one's end is seen
        run_id = fleet.client.submit("chat", {"message": f"turn {k}"}, session_id=session)
        assert fleet.client.wait(run_id, timeout=30).status == "succeeded"
        seen_at_end.append([t["run_id"] for t in sessions.turns("default", session)][-1] == run_id)
    assert seen_at_end == [True] * 5
    # A worker that died between the turn and the run's end writes it again: still one turn.
    turns = sessions.turns("default", session)
    last = turns[-1]
    sessions.append("default", session, last["run_id"], last["input"], last["result"])
    assert sessions.turns("default", session) == turns
