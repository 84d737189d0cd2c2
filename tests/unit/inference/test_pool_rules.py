"""Pure rules of the inference pool: the replicas setting, the pipeline depth's one step,
reading an engine's state from Triton's metrics text."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from pydantic import ValidationError

from fleet.inference.monitor import WAITING_TOLERATED, next_pipeline
from fleet.inference.replicas import ReplicaState, engine_state
from fleet.settings import Settings


def settings(**env: str) -> Settings:
    return Settings(_env_file=None, **env)


def test_replicas_from_json_objects_strings_or_a_comma_list_and_the_single_default():
    assert [r.name for r in settings().replicas()] == ["triton"]
    assert settings().replicas()[0].grpc_url == "127.0.0.1:8001"
    two = settings(triton_replicas='[{"name": "gpu-0", "grpc_url": "a:8001", "max_sequences": 32}, "b:8001"]')
    (a, b) = two.replicas()
    assert (a.name, a.max_sequences, a.metrics_url) == ("gpu-0", 32, "http://a:8002/metrics")
    assert (b.name, b.grpc_url) == ("b:8001", "b:8001")
    assert [r.grpc_url for r in settings(triton_replicas="x:1, y:2").replicas()] == ["x:1", "y:2"]


@pytest.mark.parametrize("value, fragment", [
    ('[{"grpc_url": "a:1", "capacity": 3}]', "Extra inputs"),
    ('[{"name": "a b", "grpc_url": "a:1"}]', "name"),
    ('[{"grpc_url": "a:1", "max_sequences": 0}]', "max_sequences"),
    ("a:1,a:1", "names must differ"),
    ("[not json", "not a JSON list"),
])
def test_bad_replica_settings_are_refused_saying_what_is_wrong(value, fragment):
    with pytest.raises(ValidationError) as err:
        settings(triton_replicas=value)
    assert fragment in str(err.value)


def state(capacity: int = 8, pipeline: int = 2, held: int = 10) -> ReplicaState:
    return ReplicaState(name="r", grpc_url="r:1", up=True, capacity=capacity, pipeline=pipeline,
                        inflight={"interactive": 1, "batch": held - 1})


def test_the_pipeline_grows_while_the_engine_has_a_free_slot_and_the_fleet_sends_all_it_may():
    assert next_pipeline(state(held=10), running=7, waiting=0, limit=16) == 3
    assert next_pipeline(state(held=9), running=7, waiting=0, limit=16) == 2  # the fleet held back: no
    assert next_pipeline(state(pipeline=16, held=24), running=7, waiting=0, limit=16) == 16  # its limit


def test_the_pipeline_shrinks_when_requests_queue_inside_the_engine():
    assert next_pipeline(state(), running=8, waiting=WAITING_TOLERATED + 1, limit=16) == 1
    assert next_pipeline(state(pipeline=0), running=8, waiting=5, limit=16) == 0
    assert next_pipeline(state(), running=8, waiting=WAITING_TOLERATED, limit=16) == 2  # tolerated


METRICS = """# HELP vllm:num_requests_running Sequences in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model="medium",version="1"} 7
vllm:num_requests_running{model="other",version="1"} 3
vllm:num_requests_waiting{model="medium",version="1"} 2
nv_inference_request_success{model="medium",version="1"} 100
"""


@pytest.fixture
def metrics_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = METRICS.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()


def test_engine_state_is_read_for_the_served_model_only(metrics_server):
    assert engine_state(metrics_server, "medium") == (7, 2)
    assert engine_state(metrics_server, "absent") is None  # nothing reported for it
    assert engine_state("http://127.0.0.1:1/metrics", "medium") is None  # unreachable


def test_a_freed_slot_wakes_the_batch_waiter_that_wants_that_replica():
    import threading

    from fleet.inference.slots import _Signal

    signal = _Signal()
    woke: list[str] = []
    ready = threading.Barrier(4)

    def waiter(name: str, prefers: str | None) -> None:
        seen = signal.seq
        ready.wait()
        signal.wait(seen, "batch", 5.0, prefers)
        woke.append(name)

    threads = [threading.Thread(target=waiter, args=a) for a in (("for-a", "a"), ("for-b", "b"), ("any", None))]
    for t in threads:
        t.start()
    ready.wait()
    while len(signal._batch) < 3:  # all three registered (no event announces it)
        threading.Event().wait(0.001)
    signal.wake("b")
    threads[1].join(5)
    signal.pass_on("c")  # left free at c: only a waiter for no replica takes it
    threads[2].join(5)
    assert woke == ["for-b", "any"]
    signal.pass_on("c")  # nobody here would take a slot at c: the waiter for a sleeps on
    threads[0].join(0.05)  # time to go, were it woken
    assert threads[0].is_alive() and woke == ["for-b", "any"]
    signal.wake("c")  # a slot news: the longest waiting goes when nobody wants that replica
    threads[0].join(5)
    assert woke == ["for-b", "any", "for-a"]
