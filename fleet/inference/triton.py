"""Client of Triton Inference Server for llm steps, speaking the vLLM backend's contract.

One gRPC channel per process, shared by every thread of an inference worker. Each
generation is its own ``ModelStreamInfer`` call on that channel, so each carries its own
gRPC deadline (the run's remaining budget) and can be cancelled alone; tritonclient's
stream helper allows a single stream per client, which would serialize a threaded worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from fleet.core import tracing
from fleet.errors import (
    DeadlineExceeded,
    PermanentError,
    ReplicaUnavailable,
    RunCancelled,
    from_rpc_error,
    from_triton_message,
    from_triton_status,
)

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Optional inputs of the vLLM backend; sent only to models that declare them.
_OPTIONAL_FLAGS = ("return_num_input_tokens", "return_num_output_tokens", "return_finish_reason")


@dataclass
class Generation:
    """The outcome of one model call."""

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str | None
    ttft_s: float | None
    duration_s: float
    # Filled in by the inference pool: where it ran and what it went through on the way.
    replica: str = ""
    preemptions: int = 0
    failovers: int = 0
    slot_wait_s: float = 0.0
    route: str = ""  # why the router chose the replica (fleet.inference.routing.REASONS)
    hit_blocks: int = 0  # leading prompt blocks the router expected cached there
    prompt_blocks: int = 0  # the prompt's full blocks as the router counts them


def _bytes_input(req: service_pb2.ModelInferRequest, name: str, value: str) -> None:
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = name, "BYTES"
    tensor.shape.append(1)
    # serialize_byte_tensor gives a 0-d object array holding the length-prefixed bytes.
    req.raw_input_contents.append(serialize_byte_tensor(np.array([value.encode()], dtype=object)).item())


def _ids_input(req: service_pb2.ModelInferRequest, name: str, ids: Sequence[int]) -> None:
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = name, "INT32"
    tensor.shape.append(len(ids))
    req.raw_input_contents.append(np.asarray(ids, dtype=np.int32).tobytes())


def _bool_input(req: service_pb2.ModelInferRequest, name: str, value: bool) -> None:
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = name, "BOOL"
    tensor.shape.append(1)
    req.raw_input_contents.append(np.array([value], dtype=bool).tobytes())


def _first(result: InferResult, name: str) -> Any:
    try:
        value = result.as_numpy(name)
    except Exception:  # output absent from this response
        return None
    if value is None or value.size == 0:
        return None
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else item


def _let_end(call: Any, wait_s: float = 1.0) -> None:
    """Give Triton a moment to end a stream it has answered in full (usually well under a
    millisecond): a stream cancelled at once at times leaves Triton's request span open, and
    never exported. One that lingers is cancelled."""
    ended = threading.Event()
    call.add_done_callback(lambda _: ended.set())
    ended.wait(wait_s)


class TritonClient:
    """A thread-safe Triton gRPC client bound to one endpoint."""

    def __init__(self, url: str, connect_wait_s: float = 5.0) -> None:
        self.url = url
        self.connect_wait_s = connect_wait_s
        self._channel = grpc.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Reconnect within a second or two after Triton comes back (gRPC's default
                # backoff grows to minutes, failing every retry of a step in the meantime).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._state = grpc.ChannelConnectivity.IDLE
        self._channel.subscribe(self._on_state, try_to_connect=True)
        self._inputs: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.unsubscribe(self._on_state)
        self._channel.close()

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        self._state = state

    def _await_connection(self, budget_s: float) -> None:
        """Wait (briefly) for the connection when Triton was unreachable.

        Right after Triton comes back the channel may still be in reconnect backoff, and a
        call would fail at once; waiting a few seconds here keeps a retry from being spent
        on that.
        """
        if self._state == grpc.ChannelConnectivity.READY:
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(0.0, min(budget_s, self.connect_wait_s)))
        except grpc.FutureTimeoutError:
            raise ReplicaUnavailable(f"triton at {self.url} unreachable for {self.connect_wait_s:.0f}s") from None

    # --- health ---------------------------------------------------------------------
    def server_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether the server answers and reports ready."""
        try:
            return self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s).ready
        except grpc.RpcError:
            return False

    def model_ready(self, model: str, timeout_s: float = 2.0) -> bool:
        """Whether the model is loaded and ready."""
        req = service_pb2.ModelReadyRequest(name=model)
        for attempt in range(2):
            try:
                return self._stub.ModelReady(req, timeout=timeout_s).ready
            except grpc.RpcError as exc:
                # A channel idle long enough may have been sent away (GOAWAY, too many
                # keepalive pings): the call that finds out fails UNAVAILABLE, and the channel
                # connects again for the next one.
                if attempt or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return False
        return False

    def model_capacity(self, model: str, timeout_s: float = 2.0) -> int | None:
        """The model's ``max_num_seqs`` config parameter (most sequences its engine runs at
        once), or None when it does not declare one.

        Raises:
            ReplicaUnavailable: the server cannot be reached.
        """
        try:
            reply = self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ReplicaUnavailable(f"triton at {self.url}: {exc.code().name} {exc.details() or ''}") from None
        param = reply.config.parameters.get("max_num_seqs")
        if param is None or not param.string_value.strip():
            return None
        try:
            return int(param.string_value)
        except ValueError:
            raise ValueError(f"model {model} at {self.url}: max_num_seqs={param.string_value!r} "
                             "is not a number") from None

    def _model_inputs(self, model: str) -> frozenset[str]:
        with self._lock:
            cached = self._inputs.get(model)
        if cached is not None:
            return cached
        try:
            meta = self._stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise ReplicaUnavailable(f"triton at {self.url}: {exc.details() or 'unavailable'}") from None
            raise from_triton_status(exc.code().name, exc.details() or "") from None
        names = frozenset(t.name for t in meta.inputs)
        with self._lock:
            self._inputs[model] = names
        return names

    # --- generation -----------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        *,
        model: str,
        priority: int,
        timeout_s: float,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        stream: bool = True,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        bind: Callable[[Any], None] | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Generation:
        """Generate text for ``prompt``, streaming tokens to ``on_token``.

        Args:
            priority: Triton request priority (1 is the highest level). Backends without
                a dynamic batcher (vLLM) ignore it; the fleet's queues carry priority too.
            token_ids: the prompt as the model's tokenizer made it (a chat format's control
                tokens included), sent as ``prompt_token_ids``; the model must declare that
                input (``text_input`` then only names the prompt in logs and traces).
            timeout_s: the run's remaining budget; the request is cancelled when it passes.
            stream: token by token (time to first token is measured, ``cancelled`` is polled
                between tokens), or one response with the whole text.
            cancelled: polled between tokens; when it returns True the request is cancelled.
            bind: receives the gRPC call, which its holder may cancel from another thread.
            metadata: gRPC metadata of the request; by default the caller's trace context
                (``traceparent``), which makes Triton's own spans part of the run's trace.

        Raises:
            DeadlineExceeded: ``timeout_s`` passed before the generation finished.
            ReplicaUnavailable: this replica cannot be reached (another one may serve it).
            TransientError / PermanentError: per :func:`fleet.errors.from_triton_status`.
        """
        if timeout_s <= 0:
            raise DeadlineExceeded("no time left for the model call")
        self._await_connection(timeout_s)
        req = self._request(prompt, sampling, model=model, priority=priority, timeout_s=timeout_s,
                            request_id=request_id, stream=stream, token_ids=token_ids)
        if metadata is None:
            metadata = tracing.grpc_metadata()  # None while tracing is off
        started = time.monotonic()
        call = self._stub.ModelStreamInfer(iter([req]), timeout=timeout_s, metadata=metadata)
        if bind is not None:
            bind(call)
        try:
            return self._read(call, prompt, started, stream=stream, on_token=on_token, cancelled=cancelled,
                              traced=bool(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc.code().name, exc.details() or "", where=self.url, budget_s=timeout_s,
                                 cancelled=cancelled is not None and cancelled()) from None
        finally:
            call.cancel()  # no-op when complete; frees the stream when we stop early

    def _request(self, prompt: str, sampling: dict[str, Any], *, model: str, priority: int, timeout_s: float,
                 request_id: str, stream: bool, token_ids: Sequence[int] | None = None
                 ) -> service_pb2.ModelInferRequest:
        """The request, in the vLLM backend's tensors (its optional flags only where declared)."""
        declared = self._model_inputs(model)
        if token_ids is not None and "prompt_token_ids" not in declared:
            raise PermanentError(
                f"model {model} at {self.url} declares no prompt_token_ids input, and its prompts are token "
                "ids (a chat format's control tokens do not survive as text): serve it with the model.py of "
                "triton_models/medium")
        req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        req.parameters["priority"].uint64_param = priority
        # Triton's own queue timeout, in microseconds; the gRPC deadline bounds the rest.
        req.parameters["timeout"].int64_param = int(timeout_s * 1_000_000)
        _bytes_input(req, "text_input", prompt)
        if token_ids is not None:
            _ids_input(req, "prompt_token_ids", token_ids)
        _bool_input(req, "stream", stream)
        _bytes_input(req, "sampling_parameters", json.dumps(sampling))
        _bool_input(req, "exclude_input_in_output", True)
        for flag in _OPTIONAL_FLAGS:
            if flag in declared:
                _bool_input(req, flag, True)
        if "priority" in declared:
            # An engine that orders its waiting requests by priority (lower first) gets the class's
            # level as an input too: Triton's own request priority does not reach a python model.
            _ids_input(req, "priority", [priority])
        return req

    def _read(self, call: Any, prompt: str, started: float, *, stream: bool,
              on_token: Callable[[str], None] | None, cancelled: Callable[[], bool] | None,
              traced: bool) -> Generation:
        """The generation, read from the call's responses as they come."""
        pieces: list[str] = []
        ttft: float | None = None
        tokens_in = tokens_out = 0
        finish: str | None = None
        for response in call:
            if response.error_message:
                raise from_triton_message(response.error_message)
            result = InferResult(response.infer_response)
            text = _first(result, "text_output")
            if text:
                if ttft is None and stream:
                    ttft = time.monotonic() - started
                pieces.append(text)
                if on_token is not None:
                    on_token(text)
            n_in, n_out = _first(result, "num_input_tokens"), _first(result, "num_output_tokens")
            tokens_in = int(n_in) if n_in is not None else tokens_in
            if n_out is not None:
                tokens_out += int(n_out)
            elif text:  # a backend without token counts: one token per streamed piece
                tokens_out += 1 if stream else len(text.split())
            finish = _first(result, "finish_reason") or finish
            final = response.infer_response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                if traced:  # Triton's spans of this request are wanted
                    _let_end(call)
                break
            if cancelled is not None and cancelled():
                call.cancel()
                raise RunCancelled("run cancelled during generation")
        return Generation(
            text="".join(pieces),
            tokens_in=tokens_in or len(prompt.split()),
            tokens_out=tokens_out,
            finish_reason=finish,
            ttft_s=ttft,
            duration_s=time.monotonic() - started,
        )

