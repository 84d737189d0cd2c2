"""The occupancy learner: latency against running sequences, from the engine's histograms."""

from __future__ import annotations

import random

import pytest

from fleet.inference.occupancy import Histogram, Model, OccupancyLearner
from fleet.inference.replicas import latency_histograms

TPOT_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class FakeEngine:
    """Cumulative TPOT histograms of an engine whose step takes ``base * (1 + slope * (n - 1))``."""

    def __init__(self, base: float = 0.01, slope: float = 0.05, seed: int = 1) -> None:
        self.base, self.slope = base, slope
        self.counts = [0.0] * (len(TPOT_BOUNDS) + 1)
        self.total = self.count = 0.0
        self.rng = random.Random(seed)

    def run(self, n: int, steps: int = 5) -> Histogram:
        for _ in range(steps):
            value = self.base * (1 + self.slope * (n - 1)) * self.rng.uniform(0.98, 1.02)
            for _ in range(n):
                for i, bound in enumerate((*TPOT_BOUNDS, float("inf"))):
                    if value <= bound:
                        self.counts[i] += 1
                self.total += value
                self.count += 1
        return Histogram(TPOT_BOUNDS, tuple(self.counts), self.total, self.count)


def feed(learner: OccupancyLearner, engine: FakeEngine, levels: list[int], t0: float = 0.0, dt: float = 0.1) -> float:
    t = t0
    for n in levels:
        for _ in range(30):
            learner.observe(n, {"tpot": engine.run(n)}, now=t)
            t += dt
    return t


def test_the_fit_finds_how_step_time_grows_with_running_sequences():
    learner, engine = OccupancyLearner(halflife_s=30), FakeEngine(base=0.01, slope=0.05)
    feed(learner, engine, [4, 16, 8, 32, 2, 24])
    model = learner.model("tpot")
    assert model is not None
    assert model.b == pytest.approx(0.01 * 0.05, rel=0.1)
    assert model.a + model.b == pytest.approx(0.01, rel=0.1)
    assert 1.0 <= model.tail < 1.1
    assert learner.model("ttft") is None  # never seen


def test_a_tighter_objective_gives_a_lower_limit_and_none_when_everything_holds():
    learner, engine = OccupancyLearner(halflife_s=30), FakeEngine(base=0.01, slope=0.05)
    feed(learner, engine, [4, 16, 8, 32, 2, 24])
    limits = [learner.limit({"tpot": target}, 0.9, capacity=64) for target in (0.02, 0.03, 0.04)]
    assert limits[0] < limits[1] < limits[2]
    # step time at n: 0.01 * (1 + 0.05 (n - 1)) <= 0.9 * 0.02 -> n <= 17
    assert limits[0] == pytest.approx(17, abs=2)
    assert learner.limit({"tpot": 1.0}, 0.9, capacity=64) is None
    assert learner.limit({"tpot": 0.001}, 0.9, capacity=64) == 0  # the objective first: batch waits
    assert learner.limit({"ttft": 0.001}, 0.9, capacity=64) is None  # nothing learned of it yet


def test_no_limit_before_two_occupancies_were_seen():
    learner, engine = OccupancyLearner(halflife_s=30), FakeEngine()
    feed(learner, engine, [8, 8])
    assert learner.model("tpot") is None
    assert learner.limit({"tpot": 0.001}, 0.9, capacity=64) is None


def test_it_relearns_when_the_engine_slows_down():
    learner, engine = OccupancyLearner(halflife_s=2), FakeEngine(base=0.01, slope=0.02)
    t = feed(learner, engine, [4, 16, 8, 32])
    before = learner.limit({"tpot": 0.02}, 0.9, capacity=64)
    engine.slope = 0.1  # longer contexts: each sequence costs five times as much
    feed(learner, engine, [4, 16, 8, 32] * 3, t0=t)
    after = learner.limit({"tpot": 0.02}, 0.9, capacity=64)
    assert after < before
    assert learner.model("tpot").b == pytest.approx(0.01 * 0.1, rel=0.2)


def test_a_restarted_engine_is_not_an_interval_of_negative_tokens():
    learner, engine = OccupancyLearner(halflife_s=30), FakeEngine()
    feed(learner, engine, [4, 16])
    fresh = FakeEngine().run(4)
    learner.observe(4, {"tpot": fresh}, now=100.0)
    assert learner.model("tpot").b > 0


def test_histogram_quantile_and_difference():
    h = Histogram((0.1, 0.2, 0.4), (10.0, 90.0, 100.0, 100.0), 15.0, 100.0)
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.1 * 40 / 80)
    assert h.quantile(0.99) == pytest.approx(0.2 + 0.2 * 9 / 10)
    earlier = Histogram((0.1, 0.2, 0.4), (5.0, 45.0, 50.0, 50.0), 7.0, 50.0)
    assert h.minus(earlier) == Histogram((0.1, 0.2, 0.4), (5.0, 45.0, 50.0, 50.0), 8.0, 50.0)
    assert earlier.minus(h) is None


def test_model_most():
    assert Model(0.01, 0.001, 1.0).most(0.02) == pytest.approx(10)
    assert Model(0.01, 0.0, 1.0).most(0.02) == float("inf")


def test_the_histograms_are_read_under_vllms_names():
    text = "\n".join([
        'vllm:time_per_output_token_seconds_count{model="m",version="1"} 3',
        'vllm:time_per_output_token_seconds_sum{model="m",version="1"} 0.06',
        'vllm:time_per_output_token_seconds_bucket{model="m",version="1",le="0.01"} 1',
        'vllm:time_per_output_token_seconds_bucket{model="m",version="1",le="0.025"} 3',
        'vllm:time_per_output_token_seconds_bucket{model="m",version="1",le="+Inf"} 3',
        'vllm:time_to_first_token_seconds_count{model="other",version="1"} 9',
    ])
    found = latency_histograms(text, "m")
    assert found == {"tpot": Histogram((0.01, 0.025), (1.0, 3.0, 3.0), 0.06, 3.0)}


def test_the_limit_leaves_room_for_the_interactive_requests_that_arrive_on_top():
    learner, engine = OccupancyLearner(halflife_s=30), FakeEngine(base=0.01, slope=0.05)
    feed(learner, engine, [4, 16, 8, 32, 2, 24])
    alone = learner.limit({"tpot": 0.02}, 0.9, capacity=64)
    for k in range(40):  # a steady 3: in flight when batch took its slots, nothing arrives on top
        learner.observe(8, {"tpot": engine.run(8)}, now=100.0 + k * 0.1, interactive=3)
    assert learner.headroom() == 0
    for k in range(100):  # 1 most of the time, 4 now and then: 3 arrive on top of a full batch
        learner.observe(8, {"tpot": engine.run(8)}, now=104.0 + k * 0.1, interactive=4 if k % 10 == 0 else 1)
    assert learner.headroom() == 3
    assert learner.limit({"tpot": 0.02}, 0.9, capacity=64) == alone - 3
