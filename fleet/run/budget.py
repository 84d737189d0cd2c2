"""Budgets of a run: the most tokens, and the most estimated cost, its model calls may use.

A run's budget is its agent's (``[budget]`` in the agent's TOML: ``tokens``, ``cost``)
unless the submission sets its own (``budget_tokens``, ``budget_cost``). Tokens count in and
out; the cost is :mod:`fleet.run.cost`'s estimate. Before each model call, what the run used so
far (the tokens and cost on its step records) is set against its budget
(:func:`allowance`):

- nothing left: the run ends ``budget_exceeded`` before the call
  (:class:`fleet.steps.hooks.budget.BudgetGuard`);
- less left than the step asks for: the call's ``max_tokens`` is clipped to what is left
  after its prompt (:meth:`Allowance.clip`): the prompt's tokens as the model's tokenizer
  counts them where the model's format has one (the medium model's), else estimated from the
  bytes per token of the run's earlier prompts, 4 before the first, plus 10% (the dev model's). A call cut short by that clip also ends the run
  ``budget_exceeded`` (:meth:`Clip.check`): its output is not a whole answer, and the
  budget is spent.

The time at the model is known only once a call returns, so with a price per GPU-second a
run can pass its cost budget by at most one call's seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import BudgetExceeded

if TYPE_CHECKING:  # pragma: no cover
    from fleet.run.cost import Prices
    from fleet.run.state import RunState

#: The largest token budget accepted: far above any run, low enough to stay an exact integer.
MAX_BUDGET_TOKENS = 1_000_000_000
#: The largest cost budget accepted.
MAX_BUDGET_COST = 1e9
# A prompt is estimated at the bytes per token of the run's earlier prompts (as the model
# counted them), 4 before the first (a real tokenizer's usual rate), plus a margin: the
# model's count is only known once the call returns.
_BYTES_PER_TOKEN = 4.0
_MARGIN = 1.1


class Budget(BaseModel):
    """An agent's default budget (``[budget]`` in its TOML); unset fields mean no limit."""

    model_config = ConfigDict(extra="forbid")

    tokens: int | None = Field(None, gt=0, le=MAX_BUDGET_TOKENS, description="Most tokens (in + out) per run.")
    cost: float | None = Field(None, gt=0, le=MAX_BUDGET_COST, allow_inf_nan=False,
                               description="Most estimated cost per run (FLEET_PRICE_*).")


def _left(limit: float, used: float, what: str) -> str:
    return f"{what} budget of {limit:g} spent ({used:g} used)"


@dataclass(frozen=True)
class Clip:
    """A model call's ``max_tokens`` under its run's budget."""

    step: str
    max_tokens: int
    wanted: int
    by: str | None  # the budget that clipped it ("token budget of 300"); None: not clipped

    def check(self, tokens_out: int) -> None:
        """Raise :class:`BudgetExceeded` when the call used all of a clip the budget imposed:
        its output was cut short, not a whole answer."""
        if self.by is not None and tokens_out >= self.max_tokens:
            raise BudgetExceeded(f"{self.by} spent: step {self.step}'s model call was cut at {tokens_out} tokens "
                                 f"(max_tokens clipped from {self.wanted} to {self.max_tokens})")


@dataclass(frozen=True)
class Allowance:
    """What a run's budget leaves for its next model call."""

    step: str
    budget_tokens: int | None
    budget_cost: float | None
    tokens_used: int
    cost_used: float
    bytes_per_token: float  # of the run's earlier prompts, as the model counted them
    prices: "Prices"

    def estimate(self, prompt: str) -> int:
        """The tokens ``prompt`` will likely count, before the model counts them."""
        # Rounded up, once float noise is rounded away (100 * 1.1 is 110.00000000000001).
        return math.ceil(round(len(prompt.encode()) / self.bytes_per_token * _MARGIN, 6))

    def clip(self, prompt: str, wanted: int, counted: int | None = None) -> Clip:
        """The call's ``max_tokens``: ``wanted``, clipped to what the budget leaves after the
        prompt (``counted`` tokens when the model's tokenizer counted them, else estimated).
        Raises :class:`BudgetExceeded` when not even one token of output fits."""
        prompt_tokens = counted if counted is not None else self.estimate(prompt)
        allowed, by = wanted, None
        if self.budget_tokens is not None:
            name = f"token budget of {self.budget_tokens}"
            room = self.budget_tokens - self.tokens_used - prompt_tokens
            if room < 1:
                raise BudgetExceeded(f"{name} spent: {self.tokens_used} used, and step {self.step}'s prompt "
                                     f"(~{prompt_tokens} tokens) leaves no room for output")
            if room < allowed:
                allowed, by = room, name
        if self.budget_cost is not None:
            name = f"cost budget of {self.budget_cost:g}"
            room_by_cost = self.prices.output_tokens_for(self.budget_cost - self.cost_used, prompt_tokens)
            if room_by_cost is not None and room_by_cost < 1:
                raise BudgetExceeded(f"{name} spent: {self.cost_used:.6g} used, and step {self.step}'s prompt "
                                     f"(~{prompt_tokens} tokens) leaves no room for output")
            if room_by_cost is not None and room_by_cost < allowed:
                allowed, by = room_by_cost, name
        return Clip(self.step, allowed, wanted, by)


def allowance(run: "RunState", step: str, prices: "Prices") -> Allowance | None:
    """What ``run``'s budget leaves before the model call of ``step`` (None: no budget).

    Raises:
        BudgetExceeded: nothing is left; the message names the budget.
    """
    if run.budget_tokens is None and run.budget_cost is None:
        return None
    records = run.records.values()
    tokens = sum(r.tokens_in + r.tokens_out for r in records)
    cost = sum(r.cost for r in records)
    if run.budget_tokens is not None and tokens >= run.budget_tokens:
        raise BudgetExceeded(f"{_left(run.budget_tokens, tokens, 'token')} before step {step}")
    if run.budget_cost is not None and cost >= run.budget_cost:
        raise BudgetExceeded(f"{_left(run.budget_cost, round(cost, 6), 'cost')} before step {step}")
    counted = [r for r in records if r.prompt_bytes and r.tokens_in]
    ratio = (sum(r.prompt_bytes for r in counted) / sum(r.tokens_in for r in counted)) if counted \
        else _BYTES_PER_TOKEN
    return Allowance(step, run.budget_tokens, run.budget_cost, tokens, cost, ratio, prices)
