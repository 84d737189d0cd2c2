"""The dev model's KV cache follows vLLM's automatic prefix caching: chained block hashes, the
last prompt token always computed, least recently freed blocks evicted first, held blocks never."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.dev_engine import engine as dev_engine
from tests.unit.dev_model.test_engine import WAIT_S, FakeSink

PrefixCache, block_hashes, SimConfig, Engine = (
    dev_engine.PrefixCache, dev_engine.block_hashes, dev_engine.SimConfig, dev_engine.Engine)


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i} " for i in range(n)]


def test_only_full_blocks_have_hashes_and_each_names_its_whole_prefix() -> None:
    a, b = words(40), words(40)
    b[3] = "changed "
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 2  # 40 tokens: two full blocks of 16, the last 8 have no hash
    # Block 1 holds the same tokens in both, but its hash chains block 0's: no match.
    assert ha[0] != hb[0] and ha[1] != hb[1]
    assert block_hashes(a[:32]) == ha


@pytest.mark.parametrize(("n", "hit"), [(16, 0), (17, 16), (32, 16), (33, 32), (47, 32)])
def test_a_repeated_prompt_recomputes_its_last_token(n: int, hit: int) -> None:
    cache = PrefixCache(num_blocks=0)
    tokens = words(n)
    first = cache.allocate(block_hashes(tokens), n, n + 1)
    assert first is not None and first.cached == []
    cache.release(first)
    again = cache.allocate(block_hashes(tokens), n, n + 1)
    assert again is not None and len(again.cached) * 16 == hit
    assert (cache.stats.queries, cache.stats.hits) == (2 * n, hit)


def test_least_recently_freed_blocks_are_evicted_first_tail_before_prefix() -> None:
    cache = PrefixCache(num_blocks=6)
    a, b, c = words(33, "a"), words(33, "b"), words(33, "c")
    for tokens in (a, b):  # 33 tokens + 15 out = 48 tokens: 3 blocks, 2 of them hashed
        alloc = cache.allocate(block_hashes(tokens), 33, 48)
        assert alloc is not None
        cache.release(alloc)
    assert cache.resident == 4
    # c needs 3 blocks; 2 were never used, so one resident block goes: a's tail (freed first).
    alloc_c = cache.allocate(block_hashes(c), 33, 48)
    assert alloc_c is not None and cache.stats.evicted_blocks == 1
    assert cache.hit_blocks(block_hashes(a), 33) == 1  # a's prefix block outlived its tail
    assert cache.hit_blocks(block_hashes(b), 33) == 2


def test_blocks_a_running_sequence_holds_are_never_evicted() -> None:
    cache = PrefixCache(num_blocks=4)
    running = cache.allocate(block_hashes(words(40, "r")), 40, 48)  # 3 blocks held
    assert running is not None
    assert cache.allocate(block_hashes(words(20, "n")), 20, 32) is None  # needs 2, 1 spare
    assert cache.used_fraction == pytest.approx(3 / 4)
    # A request sharing the running one's prefix shares its blocks: 1 own block fits.
    shared = cache.allocate(block_hashes(words(40, "r")), 40, 48)
    assert shared is not None and len(shared.cached) == 2 and shared.own == 1
    cache.release(running)
    cache.release(shared)
    assert cache.used_fraction == 0.0 and cache.resident == 2


def test_a_finished_sequence_caches_the_blocks_its_output_filled() -> None:
    cache = PrefixCache(num_blocks=0)
    prompt, out = words(20, "p"), words(20, "o")
    alloc = cache.allocate(block_hashes(prompt), 20, 40)
    assert alloc is not None
    cache.release(alloc, block_hashes(prompt[16:] + out, parent=block_hashes(prompt)[0]))
    follow_up = prompt + out + words(5, "next")
    assert cache.hit_blocks(block_hashes(follow_up), len(follow_up)) == 2


def _run(engine, prompt: str, max_tokens: int = 4) -> FakeSink:  # noqa: ANN001
    sink = FakeSink()
    engine.submit(prompt, {"max_tokens": max_tokens}, sink)
    assert sink.done.wait(WAIT_S) and sink.error is None
    return sink


def test_the_engine_charges_prefill_after_the_cached_prefix_only(engine_factory) -> None:  # noqa: ANN001
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, load_factor=0)
    engine = engine_factory(cfg)
    system = " ".join(f"rule{i}" for i in range(100))
    _run(engine, f"{system}\nUser: first question\nAgent:")
    _run(engine, f"{system}\nUser: another question here\nAgent:")
    stats = engine.stats()
    first_len = len(dev_engine.tokenize(f"{system}\nUser: first question\nAgent:"))
    # The second prompt shares the system text's 6 full blocks (100 words) with the first.
    assert stats.prefix_hits == 96
    assert stats.prefix_queries == first_len + len(dev_engine.tokenize(f"{system}\nUser: another question here\nAgent:"))


def test_a_request_waits_for_kv_blocks_first_come_first_served(engine_factory) -> None:  # noqa: ANN001
    cfg = SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=1, load_factor=0, num_gpu_blocks=4)
    engine = engine_factory(cfg)
    sinks = [FakeSink() for _ in range(3)]
    for i, sink in enumerate(sinks):  # 30 + 20 tokens: 4 blocks each, the whole cache
        engine.submit(" ".join(f"x{i}_{k}" for k in range(30)), {"max_tokens": 20}, sink)
    assert all(s.done.wait(WAIT_S) for s in sinks)
    stats = engine.stats()
    assert stats.max_active == 1 and stats.completed == 3
    assert stats.slot_waits >= 1  # counted as vLLM counts num_requests_waiting


def test_a_request_larger_than_the_cache_is_refused(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, num_gpu_blocks=2))
    with pytest.raises(ValueError, match="need 4 KV blocks; the cache holds 2"):
        engine.submit(" ".join(f"y{k}" for k in range(40)), {"max_tokens": 20}, FakeSink())


def test_block_trace_records_each_prompt(tmp_path, engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, block_trace_dir=str(tmp_path)))
    prompt = " ".join(f"z{k}" for k in range(40))
    _run(engine, prompt)
    _run(engine, prompt)
    engine.stop()
    (trace,) = tmp_path.glob("*.jsonl")
    first, again = [json.loads(x) for x in trace.read_text().splitlines()]
    assert first["n"] == 40 and (first["hit"], again["hit"]) == (0, 2)
    assert first["h"] == again["h"] == [h[:8].hex() for h in block_hashes(dev_engine.tokenize(prompt))]


def test_block_trace_records_the_wait_for_a_sequence_and_whether_the_request_streams(tmp_path, engine_factory) -> None:  # noqa: ANN001, E501
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=5, max_num_seqs=1,
                                      block_trace_dir=str(tmp_path)))
    busy = FakeSink()
    engine.submit(" ".join(f"b{k}" for k in range(20)), {"max_tokens": 100_000}, busy)
    assert busy.first_token.wait(WAIT_S)  # the only sequence slot is taken, for minutes
    waiting = FakeSink()
    engine.submit(" ".join(f"s{k}" for k in range(20)), {"max_tokens": 2}, waiting, stream=True)
    submitted = time.monotonic()
    assert not waiting.first_token.wait(0.05)  # it waits while the slot is taken
    freed = time.monotonic()
    busy.cancel()
    assert waiting.done.wait(WAIT_S) and waiting.error is None
    engine.stop()
    (trace,) = tmp_path.glob("*.jsonl")
    first, second = [json.loads(x) for x in trace.read_text().splitlines()]
    assert (first["s"], second["s"]) == (False, True)
    assert second["w"] >= freed - submitted  # admitted only once the busy request let go of the slot


def test_prefix_caching_can_be_turned_off(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory(SimConfig(ttft_ms=0, prefill_ms_per_token=0, tpot_ms=0, enable_prefix_caching=False))
    prompt = " ".join(f"q{k}" for k in range(40))
    _run(engine, prompt)
    _run(engine, prompt)
    assert engine.stats().prefix_hits == 0


def test_config_parameters_parse_booleans_and_text() -> None:
    cfg = SimConfig.from_parameters({"enable_prefix_caching": "false", "num_gpu_blocks": "128",
                                     "block_trace_dir": "/tmp/x"})
    assert (cfg.enable_prefix_caching, cfg.num_gpu_blocks, cfg.block_trace_dir) == (False, 128, "/tmp/x")
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        SimConfig.from_parameters({"enable_prefix_caching": "maybe"})

