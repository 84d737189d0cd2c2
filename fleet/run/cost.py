"""What a model call is estimated to cost, from the prices in the settings.

Prices are per 1,000 prompt tokens, per 1,000 generated tokens and per second at the model
(``FLEET_PRICE_PER_1K_INPUT_TOKENS``, ``FLEET_PRICE_PER_1K_OUTPUT_TOKENS``,
``FLEET_PRICE_PER_GPU_S``), in whatever currency the operator reads reports in; all zero by
default, so every cost is 0 until prices are set. The time at the model is the model call's
duration, as the worker measured it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import Settings


@dataclass(frozen=True)
class Prices:
    """The prices an estimated cost is made of."""

    per_1k_input_tokens: float = 0.0
    per_1k_output_tokens: float = 0.0
    per_gpu_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Prices":
        return cls(settings.price_per_1k_input_tokens, settings.price_per_1k_output_tokens, settings.price_per_gpu_s)

    def cost(self, tokens_in: int, tokens_out: int, model_s: float) -> float:
        """Estimated cost of one model call."""
        return (tokens_in * self.per_1k_input_tokens + tokens_out * self.per_1k_output_tokens) / 1000 \
            + model_s * self.per_gpu_s

    def output_tokens_for(self, cost: float, tokens_in: int) -> int | None:
        """How many generated tokens ``cost`` pays for after a prompt of ``tokens_in`` tokens
        (None: output is free, only the prompt and the time at the model are priced)."""
        if self.per_1k_output_tokens <= 0:
            return None
        left = cost - tokens_in * self.per_1k_input_tokens / 1000
        return math.floor(left * 1000 / self.per_1k_output_tokens + 1e-9)
