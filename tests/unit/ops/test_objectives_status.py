"""``fleet status`` shows each interactive objective beside what the engines measure."""

from __future__ import annotations

from fleet.inference.replicas import ReplicaState
from fleet.ops.status import objectives
from fleet.settings import Settings


def _replica(name: str, up: bool, **measured: float) -> ReplicaState:
    st = ReplicaState(name=name, grpc_url=f"{name}:8001", up=up)
    st.measured = dict(measured)
    return st


def test_objectives_sit_beside_the_worst_replica_measured_and_unset_ones_say_none():
    settings = Settings(objective_tpot_p99_s=0.05)
    states = [_replica("a", True, tpot=0.031, ttft=0.4), _replica("b", True, tpot=0.044),
              _replica("c", False, tpot=0.9)]
    assert objectives(settings, states) == {
        "ttft_p99_s": {"objective": None, "measured": 0.4},
        "tpot_p99_s": {"objective": 0.05, "measured": 0.044},
    }
    assert settings.objectives() == {"tpot": 0.05}
    assert Settings().objectives() == {}


def test_nothing_measured_yet_reads_none():
    assert objectives(Settings(objective_ttft_p99_s=1.0), [_replica("a", True)])["ttft_p99_s"] == {
        "objective": 1.0, "measured": None}
