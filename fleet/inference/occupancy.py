"""Batch occupancy from latency objectives: how far a replica may be filled and still keep
interactive requests within their time to first token (TTFT) and time per output token (TPOT).

In a continuous-batching engine every running sequence slows each step for all of them, so the
latency an interactive request sees depends on how many sequences run beside it. The engine
tells how long its tokens took (vLLM's ``vllm:time_to_first_token_seconds`` and
``vllm:time_per_output_token_seconds`` histograms). Between two scrapes the learner takes the
histograms' difference (its count and sum: the mean latency of the tokens of that interval) and
the mean occupancy (the requests the fleet has in flight at the replica, the unit the slot script
limits, or the engine's running sequences when more: calls from outside the fleet), and fits,
weighting each interval by its tokens and by its age (an observation counts half after
``halflife_s``, so it follows an engine whose behaviour changes)::

    mean latency(n) = a + b * n          (n: requests in flight)
    p99(n)          = mean latency(n) * tail

A request's time per output token is the mean of its gaps between tokens, so the mean of an
interval's gaps predicts it; the objectives are p99 over requests.

``tail`` is how far an interval's mean typically stands above the fit (:data:`TAIL_QUANTILE`,
at least 1). The occupancy limit is the largest ``n`` whose predicted p99 of every objective
stays within ``margin`` times the objective, less the interactive requests that may arrive on top
of it (:meth:`OccupancyLearner.headroom`); batch requests take a slot at the replica only while
fewer requests than that are in flight there (interactive ones always may; 0 when even one
request alone would miss an objective). With no objective, or before the engine has been seen at
two occupancies, there is no limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

#: Intervals kept per latency (older ones count for almost nothing after a few half-lives).
KEPT = 2000
#: The quantile of an interval's mean over the fit that sets ``tail``. Intervals scatter about the
#: fit mostly because requests start and end inside them (an interval's occupancy is the mean of its
#: two ends): a high quantile of that scatter measures the sampling, not what a request sees, and
#: (measured on the dev model) halved the occupancy an objective allows. The median keeps a bias of
#: the fit's line; ``margin`` carries the tail.
TAIL_QUANTILE = 0.5
#: The most ``tail`` may be: a burst of slow intervals must not shut batch out for good.
TAIL_MAX = 2.0
#: Occupancies must spread this much (weighted variance, in sequences squared) for a slope.
SPREAD_MIN = 0.25
LATENCIES = ("ttft", "tpot")
#: The quantile of interactive requests in flight kept free above the batch limit.
HEADROOM_QUANTILE = 0.95
#: How often the fits are made again (a fit reads every interval kept; scrapes come every 0.1 s).
REFIT_S = 1.0


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram as scraped: cumulative counts at each finite bound (and +Inf last)."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    total: float
    count: float

    def minus(self, earlier: Histogram | None) -> Histogram | None:
        """What was observed since ``earlier``; None when the engine restarted (counts fell) or
        the buckets differ."""
        if earlier is None or earlier.bounds != self.bounds or self.count < earlier.count:
            return None
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative)),
                         self.total - earlier.total, self.count - earlier.count)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated inside its bucket as Prometheus' ``histogram_quantile``."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cum in zip(self.bounds, self.cumulative):
            if cum >= rank:
                inside = cum - below
                return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
            lower, below = bound, cum
        return self.bounds[-1] if self.bounds else None


@dataclass(frozen=True)
class Model:
    """One latency as a function of the requests in flight: ``(a + b * n) * tail`` at p99."""

    a: float
    b: float
    tail: float

    def p99(self, n: float) -> float:
        return (self.a + self.b * n) * self.tail

    def most(self, target: float) -> float:
        """The most sequences whose predicted p99 stays within ``target`` (inf: any number)."""
        if self.b <= 0:
            return math.inf if self.a * self.tail <= target else 0.0
        return (target / self.tail - self.a) / self.b


class _Fit:
    """Intervals of one latency: (when, mean occupancy, mean latency, tokens)."""

    def __init__(self) -> None:
        self.seen: deque[tuple[float, float, float, float]] = deque(maxlen=KEPT)
        self.model: Model | None = None
        self.recent: Histogram | None = None  # the decayed sum of interval histograms

    def add(self, now: float, occupancy: float, delta: Histogram, decay: float) -> None:
        if delta.count <= 0:
            return
        self.seen.append((now, occupancy, delta.total / delta.count, delta.count))
        if self.recent is None or self.recent.bounds != delta.bounds:
            self.recent = delta
        else:
            r = self.recent
            self.recent = Histogram(r.bounds, tuple(decay * a + b for a, b in zip(r.cumulative, delta.cumulative)),
                                    decay * r.total + delta.total, decay * r.count + delta.count)

    def refit(self, now: float, halflife_s: float) -> None:
        weighted = [(n, m, c * 0.5 ** ((now - t) / halflife_s)) for t, n, m, c in self.seen]
        total = sum(w for _, _, w in weighted)
        if total <= 0:
            return
        nbar = sum(n * w for n, _, w in weighted) / total
        mbar = sum(m * w for _, m, w in weighted) / total
        snn = sum(w * (n - nbar) ** 2 for n, _, w in weighted)
        if snn / total < SPREAD_MIN:
            return  # one occupancy only: no slope to learn; the last model stands
        b = max(0.0, sum(w * (n - nbar) * (m - mbar) for n, m, w in weighted) / snn)
        a = mbar - b * nbar
        ratios = sorted((m / (a + b * n), w) for n, m, w in weighted if a + b * n > 0)
        self.model = Model(a, b, min(TAIL_MAX, max(1.0, _weighted_quantile(ratios, TAIL_QUANTILE))))


def _weighted_quantile(pairs: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile of sorted ``(value, weight)`` pairs (1.0 when there are none)."""
    total = sum(w for _, w in pairs)
    acc = 0.0
    for value, w in pairs:
        acc += w
        if acc >= q * total:
            return value
    return pairs[-1][0] if pairs else 1.0


class OccupancyLearner:
    """What one replica's engine has shown of its latencies against its occupancy."""

    def __init__(self, halflife_s: float) -> None:
        self.halflife_s = halflife_s
        self._fits = {name: _Fit() for name in LATENCIES}
        self._last: dict[str, Histogram] = {}
        self._last_at: float | None = None
        self._last_occupancy: int | None = None
        self._fitted_at: float | None = None
        self._interactive: deque[tuple[float, int]] = deque(maxlen=KEPT)

    def observe(self, occupancy: int, histograms: dict[str, Histogram | None], now: float | None = None,
                interactive: int = 0) -> None:
        """One scrape of the engine: its occupancy (requests in flight there, ``interactive`` of them
        interactive) and its cumulative latency histograms."""
        now = time.monotonic() if now is None else now
        self._interactive.append((now, interactive))
        while self._interactive and self._interactive[0][0] < now - self.halflife_s:
            self._interactive.popleft()
        decay = 1.0 if self._last_at is None else 0.5 ** ((now - self._last_at) / self.halflife_s)
        mean = occupancy if self._last_occupancy is None else (occupancy + self._last_occupancy) / 2
        for name in LATENCIES:
            h = histograms.get(name)
            if h is None:
                continue
            delta = h.minus(self._last.get(name))
            if delta is not None:
                self._fits[name].add(now, mean, delta, decay)
            self._last[name] = h
        self._last_at, self._last_occupancy = now, occupancy
        if self._fitted_at is None or now - self._fitted_at >= REFIT_S or any(
                f.model is None for f in self._fits.values() if f.seen):
            self._fitted_at = now
            for fit in self._fits.values():
                fit.refit(now, self.halflife_s)

    def model(self, name: str) -> Model | None:
        """The fitted ``name`` latency (``'ttft'`` or ``'tpot'``), None before two occupancies were seen."""
        return self._fits[name].model

    def limit(self, objectives: dict[str, float], margin: float, capacity: int) -> int | None:
        # ``capacity``: the most requests in flight the batch policy itself lets a replica have.
        """The most requests in flight at which batch may still take a slot: the largest occupancy
        whose predicted p99 holds every objective within ``margin``; 0 when not even one request
        holds them (the objectives come first: batch waits), None when nothing limits it below
        ``capacity``."""
        most = math.inf
        for name, objective in objectives.items():
            model = self.model(name)
            if model is not None:
                most = min(most, model.most(objective * margin))
        if most >= capacity:
            return None
        return max(0, math.floor(most - self.headroom()))

    def headroom(self) -> int:
        """Interactive requests that arrive on top of a full batch (batch stops at the limit; they do
        not): how far the interactive requests in flight rise above their median, at the
        :data:`HEADROOM_QUANTILE`, over the last ``halflife_s`` (those at the median were in flight
        when batch took its slots, and counted then)."""
        seen = sorted(n for _, n in self._interactive)
        if not seen:
            return 0
        return seen[min(len(seen) - 1, int(HEADROOM_QUANTILE * len(seen)))] - seen[len(seen) // 2]

    def measured(self) -> dict[str, float]:
        """Each latency's p99 over the recent scrapes (decayed), as far as seen."""
        out = {}
        for name, fit in self._fits.items():
            p99 = fit.recent.quantile(0.99) if fit.recent is not None else None
            if p99 is not None:
                out[name] = p99
        return out
