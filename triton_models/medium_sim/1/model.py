"""Triton python model of ``medium_sim``, the simulator of the medium model.

A thin adapter: it reads tensors the way Triton's vLLM backend does, hands each request
to the dev engine (``dev_engine.Engine``, beside this file) and turns what the engine produces
back into decoupled responses. All behaviour (text, timing, faults) lives in ``dev_engine.py``,
which unit tests import without Triton.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The engine sits beside this file; the python backend stub does not put this folder on
# sys.path itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from dev_engine import (  # noqa: E402
    INVALID_ARG,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    UNAVAILABLE,
    Engine,
    SimConfig,
    count_tokens,
    parse_sampling_parameters,
)

logger = logging.getLogger(__name__)

_STREAM_WITH_PROMPT = "When streaming, `exclude_input_in_output` = False is not allowed."


def _error_code(code: str) -> int:
    if code == INVALID_ARG:
        return pb_utils.TritonError.INVALID_ARG
    if code == UNAVAILABLE:
        return pb_utils.TritonError.UNAVAILABLE
    return pb_utils.TritonError.INTERNAL


def _send_error(sender: Any, code: int, message: str) -> None:
    sender.send(
        pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )


def _bool_input(request: Any, name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return bool(tensor.as_numpy().reshape(-1)[0])


class _ResponseSink:
    """Turns engine tokens into responses shaped like the vLLM backend's.

    Streaming: one response per token carrying only the new text (never the prompt),
    the last one flagged COMPLETE_FINAL. Otherwise: one final response with the whole
    text, the prompt first unless ``exclude_input_in_output`` is true.
    """

    def __init__(
        self,
        sender: Any,
        *,
        stream: bool,
        prefix: str,
        num_input_tokens: int,
        outputs: dict[str, bool],
        text_dtype: Any,
    ) -> None:
        self._sender = sender
        self._stream = stream
        self._prefix = prefix
        self._num_input_tokens = num_input_tokens
        self._outputs = outputs
        self._text_dtype = text_dtype
        self._pieces: list[str] = []

    def is_cancelled(self) -> bool:
        return bool(self._sender.is_cancelled())

    def _response(self, text: str, n_tokens: int, finish_reason: str | None) -> Any:
        tensors = [
            pb_utils.Tensor(
                "text_output", np.asarray([text.encode("utf-8")], dtype=self._text_dtype)
            )
        ]
        if self._outputs["return_finish_reason"]:
            # The vLLM backend sends str(None) while a sequence is still running.
            tensors.append(
                pb_utils.Tensor(
                    "finish_reason", np.asarray([str(finish_reason).encode()], dtype=np.object_)
                )
            )
        if self._outputs["return_num_input_tokens"]:
            tensors.append(
                pb_utils.Tensor(
                    "num_input_tokens", np.asarray([self._num_input_tokens], dtype=np.uint32)
                )
            )
        if self._outputs["return_num_output_tokens"]:
            tensors.append(
                pb_utils.Tensor("num_output_tokens", np.asarray([n_tokens], dtype=np.uint32))
            )
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def send_token(self, token: str, finish_reason: str | None) -> None:
        n_tokens = 1 if token else 0
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if finish_reason else 0
        if self._stream:
            self._sender.send(self._response(token, n_tokens, finish_reason), flags=flags)
            return
        self._pieces.append(token)
        if finish_reason:
            text = self._prefix + "".join(self._pieces)
            n_out = sum(1 for p in self._pieces if p)
            self._sender.send(self._response(text, n_out, finish_reason), flags=flags)

    def send_error(self, code: str, message: str) -> None:
        _send_error(self._sender, _error_code(code), message)

    def send_cancelled(self) -> None:
        _send_error(self._sender, pb_utils.TritonError.CANCELLED, "Request was cancelled")


class _EngineMetrics:
    """The engine's state on Triton's metrics port, under the names the medium model's Triton
    exports vLLM's (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
    ``vllm:request_success_total``, ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries_total``,
    ``vllm:prefix_cache_hits_total``, ``vllm:cache_config_info``; see ``triton_models/medium/1/model.py``)
    and the vLLM backend's own latency histograms (``vllm:time_to_first_token_seconds``,
    ``vllm:time_per_output_token_seconds``, with its bucket bounds),
    plus what only the simulator knows: its capacity
    (``medium_sim:max_num_seqs``), the most sequences it ever ran at once and its decode
    steps. Published every ``interval_s`` by a thread (each update is a call into the server).
    """

    def __init__(self, engine: Engine, labels: dict[str, str], interval_s: float = 0.05) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._stop = threading.Event()
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER

        # A family must outlive its metrics (the server deletes a metric with its family).
        self._families: list[Any] = []

        def family(name: str, kind: Any, description: str) -> Any:
            fam = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        def metric(name: str, kind: Any, description: str) -> Any:
            return family(name, kind, description).Metric(labels=labels)

        def by_stream(name: str, kind: Any, description: str) -> tuple[Any, Any]:
            fam = family(name, kind, description)
            return (fam.Metric(labels={**labels, "stream": "false"}), fam.Metric(labels={**labels, "stream": "true"}))

        self._running = metric("vllm:num_requests_running", gauge, "Sequences in the running batch.")
        self._waiting = metric("vllm:num_requests_waiting", gauge,
                               "Sequences ready to run that found every sequence slot taken.")
        self._arriving = metric("medium_sim:num_requests_arriving", gauge,
                                "Sequences within their time to first token, not yet schedulable.")
        self._slot_waits = by_stream("medium_sim:slot_waits_total", counter,
                                     "Sequences that waited inside the engine for a sequence slot.")
        self._slot_wait_max = by_stream("medium_sim:slot_wait_steps_max", gauge,
                                        "Most engine steps a sequence waited for a sequence slot.")
        self._success = metric("vllm:request_success_total", counter, "Sequences that finished.")
        self._capacity = metric("medium_sim:max_num_seqs", gauge, "Most sequences the engine runs at once.")
        self._peak = metric("medium_sim:num_requests_running_max", gauge, "Most sequences ever running at once.")
        self._steps = metric("medium_sim:engine_steps_total", counter, "Decode steps the engine took.")
        self._cancelled = metric("medium_sim:requests_cancelled_total", counter,
                                 "Sequences dropped because their client cancelled them.")
        self._kv_usage = metric("vllm:kv_cache_usage_perc", gauge, "KV-cache usage (1 means 100 percent).")
        self._prefix_queries = metric("vllm:prefix_cache_queries_total", counter, "Prefix cache queries, in tokens.")
        self._prefix_hits = metric("vllm:prefix_cache_hits_total", counter, "Prefix cache hits, in tokens.")
        # The vLLM backend's latency histograms, with its names and bucket bounds.
        histogram = pb_utils.MetricFamily.HISTOGRAM
        self._ttft = family("vllm:time_to_first_token_seconds", histogram,
                            "Histogram of time to first token in seconds.").Metric(
            labels=labels, buckets=list(TTFT_BUCKETS_S))
        self._tpot = family("vllm:time_per_output_token_seconds", histogram,
                            "Histogram of time per output token in seconds.").Metric(
            labels=labels, buckets=list(TPOT_BUCKETS_S))
        cfg = engine.cfg
        # vLLM's cache configuration as labels of a gauge set to 1 (vLLM's own form of it).
        self._cache_info = family("vllm:cache_config_info", gauge, "Information of the KV cache configuration.").Metric(labels={
            **labels, "block_size": str(cfg.block_size), "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "enable_prefix_caching": str(cfg.enable_prefix_caching)})
        self._cache_info.set(1)
        self._capacity.set(cfg.max_num_seqs)
        self._sent = (0, 0, 0, 0, 0)
        self._sent_prefix = (0, 0)
        self._thread = threading.Thread(target=self._loop, name="medium-sim-metrics", daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        stats = self._engine.stats()
        self._running.set(stats.active)
        self._waiting.set(stats.waiting)
        self._arriving.set(stats.arriving)
        self._peak.set(stats.max_active)
        self._slot_wait_max[0].set(stats.slot_wait_steps_max)
        self._slot_wait_max[1].set(stats.slot_wait_steps_max_stream)
        # Counters first: whoever sees the success count see the steps that led to it.
        self._steps.increment(stats.steps - self._sent[1])
        self._cancelled.increment(stats.cancelled - self._sent[2])
        self._slot_waits[0].increment(stats.slot_waits - self._sent[3])
        self._slot_waits[1].increment(stats.slot_waits_stream - self._sent[4])
        self._success.increment(stats.completed - self._sent[0])
        self._sent = (stats.completed, stats.steps, stats.cancelled, stats.slot_waits, stats.slot_waits_stream)
        self._kv_usage.set(stats.kv_usage)
        self._prefix_queries.increment(stats.prefix_queries - self._sent_prefix[0])
        self._prefix_hits.increment(stats.prefix_hits - self._sent_prefix[1])
        self._sent_prefix = (stats.prefix_queries, stats.prefix_hits)
        ttft, tpot = self._engine.drain_latencies()
        for value in ttft:
            self._ttft.observe(value)
        for value in tpot:
            self._tpot.observe(value)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._publish()
            except Exception as exc:  # noqa: BLE001 - metrics must never stop serving
                logger.warning("medium_sim metrics: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class TritonPythonModel:
    """``medium_sim``: simulator of the medium model (vLLM backend contract)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Build the simulator config from the model's parameters and start the engine."""
        model_config = json.loads(args["model_config"])
        assert pb_utils.using_decoupled_model_transaction_policy(
            model_config
        ), "medium_sim must use the decoupled transaction policy, like the vLLM backend"
        self._cfg = SimConfig.from_parameters(model_config.get("parameters", {}))
        text_config = pb_utils.get_output_config_by_name(model_config, "text_output")
        self._text_dtype = pb_utils.triton_string_to_numpy(text_config["data_type"])
        name = f"{args['model_name']}_{args.get('model_instance_name', '0')}"
        self._engine = Engine(self._cfg, name=name)
        self._metrics = _EngineMetrics(self._engine, {"model": args["model_name"],
                                                      "version": args.get("model_version", "1")})
        pb_utils.Logger.log_info(f"[medium_sim] engine started: {self._cfg}")

    def execute(self, requests: list[Any]) -> None:
        """Queue each request on the engine; responses come from the engine thread."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except ValueError as exc:
                _send_error(sender, pb_utils.TritonError.INVALID_ARG, str(exc))
            except RuntimeError as exc:
                _send_error(sender, pb_utils.TritonError.UNAVAILABLE, str(exc))
        return None

    def _submit(self, request: Any, sender: Any) -> None:
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        stream = bool(_bool_input(request, "stream"))
        exclude = _bool_input(request, "exclude_input_in_output")
        # Same default as the vLLM backend: the prompt is prepended unless streaming.
        prepend = (not exclude) if exclude is not None else not stream
        if prepend and stream:
            raise ValueError(_STREAM_WITH_PROMPT)
        raw = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        # Without the tensor, request parameters carry the sampling parameters (the
        # vLLM backend does the same; the generate endpoint uses them).
        params = parse_sampling_parameters(
            raw.as_numpy().reshape(-1)[0] if raw is not None else request.parameters()
        )
        outputs = {
            name: bool(_bool_input(request, name))
            for name in (
                "return_finish_reason",
                "return_num_input_tokens",
                "return_num_output_tokens",
            )
        }
        sink = _ResponseSink(
            sender,
            stream=stream,
            prefix=prompt if prepend else "",
            num_input_tokens=count_tokens(prompt),
            outputs=outputs,
            text_dtype=self._text_dtype,
        )
        self._engine.submit(prompt, params, sink, stream=stream)

    def finalize(self) -> None:
        """Stop the engine; requests still in flight fail with UNAVAILABLE."""
        self._metrics.stop()
        self._engine.stop()
        stats = self._engine.stats()
        pb_utils.Logger.log_info(f"[medium_sim] engine stopped: {stats}")
