"""Unit tests of the medium model simulator (text rules, timing, faults, engine)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.support.dev_engine import engine as dev_engine

(DEFAULT_MAX_TOKENS, INVALID_ARG, UNAVAILABLE, VOCABULARY, Engine, SimConfig, count_tokens, decide_fault, find_arithmetic, generate, parse_sampling_parameters, step_time_s, tokenize,) = (getattr(dev_engine, name) for name in (
    'DEFAULT_MAX_TOKENS', 'INVALID_ARG', 'UNAVAILABLE', 'VOCABULARY', 'Engine', 'SimConfig', 'count_tokens', 'decide_fault', 'find_arithmetic', 'generate', 'parse_sampling_parameters', 'step_time_s', 'tokenize',
))

WAIT_S = 10.0
ZERO = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, load_factor=0)


class FakeSink:
    """Records what the engine sends; events let tests wait without sleeping."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.tokens: list[str] = []
        self.finish_reason: str | None = None
        self.error: tuple[str, str] | None = None
        self.cancelled = False
        self.token_times: list[float] = []
        self.done = threading.Event()
        self.first_token = threading.Event()
        self._cancel_after = cancel_after
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def send_token(self, token: str, finish_reason: str | None) -> None:
        with self._lock:
            assert not self.done.is_set(), "token after the final response"
            self.tokens.append(token)
            self.token_times.append(time.monotonic())
            self.first_token.set()
            if self._cancel_after is not None and len(self.tokens) >= self._cancel_after:
                self._cancel.set()
            if finish_reason is not None:
                self.finish_reason = finish_reason
                self.done.set()

    def send_error(self, code: str, message: str) -> None:
        self.error = (code, message)
        self.done.set()

    def send_cancelled(self) -> None:
        self.cancelled = True
        self.done.set()


# --- tokens ---------------------------------------------------------------------------


def test_tokenize_keeps_trailing_whitespace() -> None:
    assert tokenize("Hello  big\nworld ") == ["Hello  ", "big\n", "world "]
    assert tokenize("   ") == []
    assert count_tokens("one two three") == 3


# --- sampling parameters --------------------------------------------------------------


def test_parse_sampling_parameters_accepts_strings_and_bytes() -> None:
    params = parse_sampling_parameters(b'{"max_tokens": "32", "temperature": "0", "seed": 7}')
    assert params == {"max_tokens": 32, "temperature": 0.0, "seed": 7}
    assert parse_sampling_parameters(None) == {}
    assert parse_sampling_parameters("  ") == {}
    assert parse_sampling_parameters('{"stop": "x"}')["stop"] == ["x"]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"max_tokens": "abc"}', "max_tokens"),
        ('{"max_tokens": 2.5}', "max_tokens"),
        ('{"max_tokens": true}', "max_tokens"),
        ('{"max_tokens": 0}', "at least 1"),
        ('{"temperature": "hot"}', "temperature"),
        ('{"sim_fault": "explode"}', "sim_fault"),
        ('{"sim_stall_ms": -1}', "sim_stall_ms"),
        ('{"stop": [1]}', "stop"),
    ],
)
def test_parse_sampling_parameters_rejects_bad_input(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_sampling_parameters(raw)


# --- text rules -----------------------------------------------------------------------


def test_pseudo_text_is_deterministic_and_exactly_max_tokens() -> None:
    tokens, reason = generate("Tell me a story", {"max_tokens": 40})
    assert reason == "length"
    assert len(tokens) == 40
    assert tokens == generate("Tell me a story", {"max_tokens": 40})[0]
    words = [t.strip().rstrip(".").lower() for t in tokens]
    assert all(w in VOCABULARY for w in words)
    text = "".join(tokens)
    assert text[0].isupper() and text.endswith(".")
    assert text.count(".") >= 2  # sentences of 9-15 words


def test_pseudo_text_depends_on_prompt_and_seed() -> None:
    base = generate("prompt", {"max_tokens": 20})[0]
    assert generate("prompt", {"max_tokens": 20, "seed": 1})[0] != base
    assert generate("other prompt", {"max_tokens": 20})[0] != base


def test_default_max_tokens_is_vllm_default() -> None:
    tokens, reason = generate("anything", {})
    assert len(tokens) == DEFAULT_MAX_TOKENS == 16
    assert reason == "length"


def test_tool_choice_calculator() -> None:
    prompt = "You are an agent.\nTools: calculator, word_count\nQuestion: What is (3 + 4) * 2?\n"
    tokens, reason = generate(prompt, {"max_tokens": 64})
    assert reason == "stop"
    assert json.loads("".join(tokens)) == {"tool": "calculator", "input": "(3 + 4) * 2"}


def test_tool_choice_other_tool_without_arithmetic() -> None:
    prompt = "Tools: calculator, word_count, search\nQuestion: How many words are here?"
    tokens, _ = generate(prompt, {"max_tokens": 64})
    expected = {"tool": "word_count", "input": "How many words are here?"}
    assert json.loads("".join(tokens)) == expected


def test_tool_choice_arithmetic_without_calculator_listed() -> None:
    tokens, _ = generate("Tools: search\nQuestion: 2 + 2", {"max_tokens": 64})
    assert json.loads("".join(tokens)) == {"tool": "search", "input": "2 + 2"}


def test_tool_choice_truncated_at_max_tokens() -> None:
    prompt = "Tools: calculator\nQuestion: What is 12 * 3?"
    tokens, reason = generate(prompt, {"max_tokens": 3})
    assert reason == "length"
    assert len(tokens) == 3


def test_answer_from_observation() -> None:
    prompt = "Tools: calculator\nQuestion: What is 12 * 3?\nAction: calculator\nObservation:  36 \n"
    tokens, reason = generate(prompt, {"max_tokens": 64})
    assert "".join(tokens) == "The answer is 36."
    assert reason == "stop"


def test_stop_string_cuts_output() -> None:
    tokens, reason = generate("Observation: red green blue", {"max_tokens": 64, "stop": ["green"]})
    assert "".join(tokens) == "The answer is red "
    assert reason == "stop"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What is 3+4?", "3+4"),
        ("Compute 2.5 * (4 - 1).", "2.5 * (4 - 1)"),
        ("What is 2^10 % 7 ?", "2^10 % 7"),
        ("How many words are in 2024?", None),
        ("Is a well-known fact true?", None),
    ],
)
def test_find_arithmetic(text: str, expected: str | None) -> None:
    assert find_arithmetic(text) == expected


# --- config, timing, faults -----------------------------------------------------------


def test_sim_config_from_parameters() -> None:
    cfg = SimConfig.from_parameters(
        {"tpot_ms": "10", "max_num_seqs": {"string_value": "4"}, "unknown": "x", "seed": "3"}
    )
    assert cfg.tpot_ms == 10.0 and cfg.max_num_seqs == 4 and cfg.seed == 3
    assert cfg.ttft_ms == 150.0
    with pytest.raises(ValueError):
        SimConfig.from_parameters({"tpot_ms": "fast"})
    with pytest.raises(ValueError):
        SimConfig.from_parameters({"error_rate": "1.5"})
    with pytest.raises(ValueError):
        SimConfig.from_parameters({"max_num_seqs": "0"})


def test_step_time() -> None:
    cfg = SimConfig(ttft_ms=100, prefill_ms_per_token=1, tpot_ms=20, load_factor=0.5)
    assert step_time_s(cfg, 0, 0, 0) == 0.0
    assert step_time_s(cfg, 1, 0, 0) == pytest.approx(0.020)
    assert step_time_s(cfg, 3, 0, 0) == pytest.approx(0.040)
    assert step_time_s(cfg, 2, 1, 10) == pytest.approx(0.030 + 0.010)  # ttft delays the request only
    assert step_time_s(ZERO, 64, 64, 1000) == 0.0


def test_decide_fault_is_reproducible_and_follows_rates() -> None:
    cfg = SimConfig(error_rate=0.3, stall_rate=0.2, seed=5)
    faults = [decide_fault(cfg, "p", i) for i in range(2000)]
    assert faults == [decide_fault(cfg, "p", i) for i in range(2000)]
    assert 0.25 < faults.count("unavailable") / 2000 < 0.35
    assert 0.10 < faults.count("stall") / 2000 < 0.18
    assert all(decide_fault(SimConfig(), "p", i) is None for i in range(100))
    assert all(decide_fault(SimConfig(error_rate=1.0), "p", i) == "unavailable" for i in range(100))


# --- engine ---------------------------------------------------------------------------


def test_engine_streams_the_generated_tokens(engine_factory) -> None:
    engine = engine_factory(ZERO)
    sink = FakeSink()
    engine.submit("hello", {"max_tokens": 5}, sink)
    assert sink.done.wait(WAIT_S)
    assert (sink.tokens, sink.finish_reason) == tuple(generate("hello", {"max_tokens": 5}))
    assert engine.stats().completed == 1


def test_engine_idle_with_zero_latency_does_not_spin(engine_factory) -> None:
    engine = engine_factory(ZERO)
    sink = FakeSink()
    engine.submit("warm up", {"max_tokens": 2}, sink)
    assert sink.done.wait(WAIT_S)
    steps = engine.stats().steps
    cpu_before = time.process_time()  # all threads, the engine's included
    threading.Event().wait(0.3)
    assert engine.stats().steps == steps
    assert time.process_time() - cpu_before < 0.1


def test_engine_batches_concurrent_sequences(engine_factory) -> None:
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=10, load_factor=0.0)
    engine = engine_factory(cfg)
    sinks = [FakeSink() for _ in range(8)]
    for i, sink in enumerate(sinks):
        engine.submit(f"prompt {i}", {"max_tokens": 10}, sink)
    assert all(s.done.wait(WAIT_S) for s in sinks)
    # Counted, not timed: sequential would take 8 x 10 steps; shared steps take about 10.
    stats = engine.stats()
    assert stats.max_active >= 2
    assert stats.steps < 40


def test_engine_respects_max_num_seqs(engine_factory) -> None:
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=1, load_factor=0, max_num_seqs=2)
    engine = engine_factory(cfg)
    sinks = [FakeSink() for _ in range(5)]
    for sink in sinks:
        engine.submit("p", {"max_tokens": 4}, sink)
    assert all(s.done.wait(WAIT_S) for s in sinks)
    assert engine.stats().max_active == 2


def test_engine_cancellation_stops_generation(engine_factory) -> None:
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=2, load_factor=0)
    engine = engine_factory(cfg)
    sink = FakeSink(cancel_after=3)
    engine.submit("long", {"max_tokens": 1000}, sink)
    assert sink.done.wait(WAIT_S)
    assert sink.cancelled
    assert len(sink.tokens) == 3
    assert sink.finish_reason is None
    assert engine.cancelled_count == 1


def test_engine_cancelled_while_waiting_is_never_admitted(engine_factory) -> None:
    engine = engine_factory(ZERO)
    sink = FakeSink()
    sink.cancel()
    engine.submit("p", {"sim_fault": "stall", "sim_stall_ms": 50}, sink)
    assert sink.done.wait(WAIT_S)
    assert sink.cancelled and sink.tokens == []
    assert engine.cancelled_count == 1


def test_engine_sim_fault_unavailable_and_invalid(engine_factory) -> None:
    engine = engine_factory(ZERO)
    unavailable, invalid = FakeSink(), FakeSink()
    engine.submit("p", {"sim_fault": "unavailable"}, unavailable)
    engine.submit("p", {"sim_fault": "invalid"}, invalid)
    assert unavailable.done.wait(WAIT_S) and invalid.done.wait(WAIT_S)
    assert unavailable.error is not None and unavailable.error[0] == UNAVAILABLE
    assert invalid.error is not None and invalid.error[0] == INVALID_ARG
    assert unavailable.tokens == [] and invalid.tokens == []
    assert engine.stats().failed == 2


def test_engine_sim_fault_stall_delays_first_token(engine_factory) -> None:
    engine = engine_factory(ZERO)
    stalled, normal = FakeSink(), FakeSink()
    started = time.monotonic()
    engine.submit("p", {"sim_fault": "stall", "sim_stall_ms": 150, "max_tokens": 2}, stalled)
    engine.submit("q", {"max_tokens": 2}, normal)
    assert normal.done.wait(WAIT_S)
    assert not stalled.first_token.is_set()  # the stalled one does not block the queue
    assert stalled.done.wait(WAIT_S)
    assert stalled.token_times[0] - started >= 0.15
    assert stalled.finish_reason == "length"


def test_engine_error_rate_one_fails_everything(engine_factory) -> None:
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, error_rate=1.0))
    sinks = [FakeSink() for _ in range(3)]
    for sink in sinks:
        engine.submit("p", {}, sink)
    assert all(s.done.wait(WAIT_S) for s in sinks)
    assert all(s.error and s.error[0] == UNAVAILABLE for s in sinks)


def test_engine_stop_fails_pending_and_rejects_new(engine_factory) -> None:
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=50))
    sink = FakeSink()
    engine.submit("p", {"max_tokens": 1000}, sink)
    assert sink.first_token.wait(WAIT_S)
    engine.stop()
    assert sink.done.is_set()
    assert sink.error is not None and sink.error[0] == UNAVAILABLE
    with pytest.raises(RuntimeError):
        engine.submit("p", {}, FakeSink())


def test_engine_survives_a_failing_sink(engine_factory) -> None:
    class BrokenSink(FakeSink):
        def send_token(self, token: str, finish_reason: str | None) -> None:
            raise RuntimeError("client gone")

    engine = engine_factory(ZERO)
    engine.submit("p", {"max_tokens": 3}, BrokenSink())
    sink = FakeSink()
    engine.submit("q", {"max_tokens": 3}, sink)
    assert sink.done.wait(WAIT_S)
    assert sink.finish_reason == "length"


def test_engine_counts_what_waited_for_a_slot_and_its_waiting_queue_is_only_ready_sequences(engine_factory) -> None:
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=1, load_factor=0, max_num_seqs=2)
    engine = engine_factory(cfg)
    first = [FakeSink() for _ in range(2)]
    for sink in first:
        engine.submit("p", {"max_tokens": 20}, sink)
    late = [FakeSink(), FakeSink()]
    engine.submit("q", {"max_tokens": 2}, late[0], stream=True)
    engine.submit("q", {"max_tokens": 2}, late[1])
    assert all(s.done.wait(WAIT_S) for s in first + late)
    stats = engine.stats()
    # Both late sequences found the two slots taken and waited whole steps, counted by kind.
    assert (stats.slot_waits_stream, stats.slot_waits) == (1, 1)
    assert stats.slot_wait_steps_max_stream >= 1 and stats.slot_wait_steps_max >= 1
    assert stats.max_active == 2


def test_a_sequence_on_its_way_in_is_arriving_not_waiting(engine_factory) -> None:
    engine = engine_factory(SimConfig(ttft_ms=60_000, prefill_ms_per_token=0, tpot_ms=1, load_factor=0))
    engine.submit("far off", {"max_tokens": 2}, FakeSink())
    stats = engine.stats()
    assert (stats.waiting, stats.arriving, stats.slot_waits) == (0, 1, 0)


def test_engine_reports_each_first_token_and_each_gap_between_tokens(engine_factory) -> None:
    cfg = SimConfig(ttft_ms=30, prefill_ms_per_token=0, tpot_ms=5, load_factor=0)
    engine = engine_factory(cfg)
    sinks = [FakeSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        engine.submit(f"prompt {i}", {"max_tokens": 4}, sink)
    assert all(s.done.wait(WAIT_S) for s in sinks)
    ttft, tpot = engine.drain_latencies()
    # vLLM's histograms: one time to first token per sequence, one gap per later token
    assert len(ttft) == 3 and len(tpot) == 3 * 3
    assert all(t >= 0.03 for t in ttft)
    assert all(0.004 <= t < 1.0 for t in tpot)
    assert engine.drain_latencies() == ([], [])


def test_latency_buckets_are_the_vllm_backends() -> None:
    assert dev_engine.TTFT_BUCKETS_S[0] == 0.001 and dev_engine.TTFT_BUCKETS_S[-1] == 10.0
    assert len(dev_engine.TTFT_BUCKETS_S) == 16 and len(dev_engine.TPOT_BUCKETS_S) == 13
    assert list(dev_engine.TPOT_BUCKETS_S) == sorted(dev_engine.TPOT_BUCKETS_S)
