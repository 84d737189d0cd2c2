"""The model catalog's rules without a server: the catalog from settings, roles, each model's
pool namespace and prices, and when a step's call goes to its fallback."""

from __future__ import annotations

import math
import time

import pytest

from fleet.inference.catalog import ModelCatalog, prices_of
from fleet.settings import Settings

SETTINGS = Settings(_env_file=None, key_prefix="f", model_roles='{"small": "small_sim"}',
                    price_per_1k_output_tokens=2.0,
                    models='[{"name": "small_sim", "replicas": ["s1:8001"], "price_per_1k_output_tokens": 0.5}]')


def test_the_catalog_roles_and_each_models_own_pool_namespace_and_prices():
    assert SETTINGS.catalog() == ["medium_sim", "small_sim"]
    assert SETTINGS.resolve_model("small") == "small_sim"
    assert SETTINGS.resolve_model(None) == "medium_sim" and SETTINGS.resolve_model("medium_sim") == "medium_sim"
    small = SETTINGS.for_model("small_sim")
    assert small.keys.prefix == "f:model:small_sim" and small.triton_model == "small_sim"
    assert [r.grpc_url for r in small.replicas()] == ["s1:8001"]
    assert SETTINGS.for_model("medium_sim") is SETTINGS  # the default model's keys are the fleet's own
    assert small.keys.slot_waiters("interactive") != SETTINGS.keys.slot_waiters("interactive")
    assert prices_of(SETTINGS, "small_sim").per_1k_output_tokens == 0.5
    assert prices_of(SETTINGS, "medium_sim").per_1k_output_tokens == 2.0


class _Catalog(ModelCatalog):
    """The catalog's choice over predicted waits given here, without pools."""

    def __init__(self, waits: dict[str, float], call_s: dict[str, float]) -> None:
        self.waits = waits
        self._call_s = call_s

    def predicted_wait_s(self, name: str, priority: str) -> float:  # type: ignore[override]
        return self.waits[name]


@pytest.mark.parametrize("wait, deadline_in_s, expected", [
    (0.0, 10.0, "medium_sim"),        # room now: its own model
    (math.inf, 10.0, "small_sim"),    # no replica up: the fallback
    (9.5, 10.0, "small_sim"),         # the wait plus a call would miss the deadline
    (5.0, 10.0, "medium_sim"),        # it fits
])
def test_a_step_falls_back_when_its_model_is_down_or_would_miss_the_deadline(wait, deadline_in_s, expected):
    catalog = _Catalog({"medium_sim": wait, "small_sim": 0.0}, {"medium_sim": 1.0})
    assert catalog.choose("medium_sim", "small_sim", "interactive", time.time() + deadline_in_s) == expected
    assert catalog.choose("medium_sim", None, "interactive", time.time() + deadline_in_s) == "medium_sim"
