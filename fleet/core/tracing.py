"""OpenTelemetry tracing of runs: one trace per run, across every process it touches.

::

    submit <agent>                        client or gateway: the run's root (PRODUCER)
    ├── queue wait                        a step's message, due -> picked up by a worker
    ├── <agent>.<step>                    its execution, one per delivery, retries included
    │   │                                 (CONSUMER), linked to the step that sent it
    │   ├── text_completion <model>       a model call (CLIENT)
    │   │   └── InferRequest              Triton's own spans (its OpenTelemetry trace mode)
    │   └── execute_tool <tool>           a tool call
    ├── queue wait
    └── <agent>.<next step> ...

Three spans a step, each with few attributes: span creation and export are most of what
tracing costs a step (``ops/bench/tracing.py`` measures it).

The context travels in each step message's headers (W3C ``traceparent``, written by
:func:`inject_message` at every publish): a publish inside a step carries the run's root,
not the step, so every step hangs off the submission whichever worker ran it (a span link
names the step that sent it). A model request carries the current context to Triton as
gRPC metadata (:func:`grpc_metadata`); the run record keeps the root's ``traceparent`` so
that a replay or a re-send joins the same trace (:func:`resumed`).

Tracing is off unless :func:`configure` turned it on (``FLEET_TRACING`` and the standard
``OTEL_*`` variables: ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_EXPORTER``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` ...). Off, every function
here returns at once, every span is one shared no-op object, and ``opentelemetry`` is
never imported: the step path pays a function call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import Settings

log = logging.getLogger(__name__)

SpanKind = Literal["internal", "server", "client", "producer", "consumer"]

#: Headers of a step message that carry the trace: W3C trace context, and the step that sent it.
TRACEPARENT, TRACESTATE, SENT_BY = "traceparent", "tracestate", "fleet_sent_by"
MESSAGE_HEADERS = (TRACEPARENT, TRACESTATE, SENT_BY)

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class NoopSpan:
    """What a span is while tracing is off: every method does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def is_recording(self) -> bool:
        return False


class _NoopScope:
    """A context manager yielding the no-op span; one shared instance serves every caller."""

    __slots__ = ()

    def __enter__(self) -> NoopSpan:
        return NOOP_SPAN

    def __exit__(self, *exc: object) -> Literal[False]:
        return False


NOOP_SPAN = NoopSpan()
_NOOP_SCOPE = _NoopScope()


@dataclass
class _On:
    """Tracing as configured in this process."""

    tracer: Any
    provider: Any  # the SDK provider made here (shut down by shutdown()), or None: the app's own
    propagator: Any
    trace: Any  # the opentelemetry.trace module
    kinds: dict[str, Any]
    link: Callable[[Any], Any]


_on: _On | None = None
_configured = False
_lock = threading.Lock()
# Inside a step: the context of the run's root, which the step's publishes carry.
_run_root: ContextVar[Any] = ContextVar("fleet_run_root", default=None)


# --- switching on -----------------------------------------------------------------------

def wanted(mode: str, environ: Mapping[str, str]) -> bool:
    """Whether this process traces: ``FLEET_TRACING`` (``mode``) and the ``OTEL_*`` variables."""
    if mode == "off" or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return mode == "on" or any(environ.get(name, "").strip() for name in _ENDPOINT_VARS)


def traces_url(environ: Mapping[str, str]) -> str:
    """Where the ``OTEL_*`` variables send traces (OTLP over HTTP), for a process that does
    not read them itself (Triton)."""
    full = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if full:
        return full
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def configure(settings: "Settings", service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on in this process when the settings and the environment ask for it.

    The first call decides; later ones return what it decided. ``service`` names the
    process (``fleet-<service>``) unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES``
    does. An app that installed its own OpenTelemetry tracer provider keeps it: fleet's
    spans go there.
    """
    global _on, _configured
    env = os.environ if environ is None else environ
    with _lock:
        if _configured:
            return _on is not None
        _configured = True
        if not wanted(settings.tracing, env):
            return False
        _on = _start(service, env)
        log.info("tracing on: service %s, exporter %s", service,
                 env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                 or "the SDK's default")
        return True


def _start(service: str, env: Mapping[str, str]) -> _On:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider: Any = None
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):  # nobody installed one: fleet's own
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        provider = TracerProvider(resource=Resource.create({} if named else {"service.name": f"fleet-{service}"}))
        if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # The endpoint the decision was made on; headers, timeout, compression: OTEL_EXPORTER_OTLP_*.
            exporter = OTLPSpanExporter(endpoint=traces_url(env))
        # Spans leave in a background thread, in batches: the step path only queues them.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        current = provider
    kinds = {k: getattr(trace.SpanKind, k.upper()) for k in ("internal", "server", "client", "producer", "consumer")}
    return _On(tracer=current.get_tracer("fleet"), provider=provider, propagator=TraceContextTextMapPropagator(),
               trace=trace, kinds=kinds, link=trace.Link)


def enabled() -> bool:
    """Whether this process traces."""
    return _on is not None


def flush(timeout_s: float = 5.0) -> None:
    """Send the spans still queued (a short-lived process before it exits)."""
    if _on is not None and _on.provider is not None:
        _on.provider.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop tracing in this process; :func:`configure` may turn it on again."""
    global _on, _configured
    with _lock:
        if _on is not None and _on.provider is not None:
            _on.provider.shutdown()
        _on, _configured = None, False


# --- spans ------------------------------------------------------------------------------

def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


def span(name: str, *, kind: SpanKind = "internal", attributes: Mapping[str, Any] | None = None,
         start_s: float | None = None) -> AbstractContextManager[Any]:
    """A span around a block, current inside it; an exception leaving the block is recorded
    on it and marks it failed."""
    if _on is None:
        return _NOOP_SCOPE
    return _on.tracer.start_as_current_span(name, kind=_on.kinds[kind], attributes=attributes,
                                            start_time=_ns(start_s))


def current_span() -> Any:
    """The span of the block being run (the no-op span when off or outside any)."""
    if _on is None:
        return NOOP_SPAN
    return _on.trace.get_current_span()


def failed(span_: Any, exc: BaseException, description: str) -> None:
    """Mark ``span_`` failed with ``exc`` (an attempt that will be retried, a dead letter)."""
    if _on is None or not span_.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span_.record_exception(exc)
    span_.set_status(Status(StatusCode.ERROR, description))


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None."""
    if _on is None:
        return None
    ctx = _on.trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def traceparent() -> str | None:
    """The current context as a W3C ``traceparent`` value, or None."""
    if _on is None:
        return None
    carrier: dict[str, str] = {}
    _on.propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


# --- across processes -------------------------------------------------------------------

def inject_message(headers: dict[str, Any]) -> None:
    """Write the trace into a step message's headers (called at every publish).

    Inside a step the message carries the run's root and names this step as its sender;
    elsewhere (a submission, a replay) it carries the current context.
    """
    if _on is None:
        return
    root = _run_root.get()
    _on.propagator.inject(headers, context=root)
    if root is not None:
        sender = _on.trace.get_current_span().get_span_context()
        if sender.is_valid:
            headers[SENT_BY] = f"{sender.trace_id:032x}-{sender.span_id:016x}"


def _context_of(value: str | None) -> Any:
    return _on.propagator.extract({TRACEPARENT: value}) if _on is not None and value else None


def _sender(value: Any) -> Any:
    """The span context a ``fleet_sent_by`` header names (``<trace id>-<span id>``), or None."""
    assert _on is not None  # noqa: S101 - tracing is on
    try:
        trace_hex, span_hex = str(value).split("-")
        return _on.trace.SpanContext(int(trace_hex, 16), int(span_hex, 16), is_remote=True,
                                     trace_flags=_on.trace.TraceFlags(_on.trace.TraceFlags.SAMPLED))
    except ValueError:  # not ours: no link
        return None


@contextmanager
def _delivery(name: str, header: Callable[[str], Any], sent_at: float | None,
              attributes: Mapping[str, Any]) -> Iterator[Any]:
    assert _on is not None  # noqa: S101 - checked by delivery()
    carrier = {k: str(v) for k in (TRACEPARENT, TRACESTATE) if (v := header(k))}
    parent = _on.propagator.extract(carrier) if carrier else None
    sent_by = header(SENT_BY)
    sender = _sender(sent_by) if sent_by else None
    links = [_on.link(sender)] if sender is not None and sender.is_valid else []
    now = time.time()
    if sent_at is not None:
        # Beside the step under the run's root, not inside it: the waterfall reads queue wait,
        # execution, queue wait, execution ...
        wait = _on.tracer.start_span("queue wait", context=parent, start_time=_ns(min(sent_at, now)))
        wait.end(end_time=_ns(now))
    with _on.tracer.start_as_current_span(name, context=parent, kind=_on.kinds["consumer"], attributes=attributes,
                                          links=links) as step_span:
        has_root = parent is not None and _on.trace.get_current_span(parent).get_span_context().is_valid
        # Without a root (a client that does not trace) the first step becomes the run's root.
        token = _run_root.set(parent if has_root else _on.trace.set_span_in_context(step_span))
        try:
            yield step_span
        finally:
            _run_root.reset(token)


def delivery(name: str, header: Callable[[str], Any], sent_at: float | None = None,
             attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """The span of one delivery of a step message, child of the run's root read from the
    message's headers (``header(name)`` reads one), after a "queue wait" span from when the
    message was due (``sent_at``) to now."""
    if _on is None:
        return _NOOP_SCOPE
    return _delivery(name, header, sent_at, attributes or {})


def resumed(traceparent_value: str | None, name: str, attributes: Mapping[str, Any] | None = None
            ) -> AbstractContextManager[Any]:
    """A span under a run's stored root, around work that resumes the run from outside a
    step (a replay, a re-send): the steps it publishes join the run's trace."""
    if _on is None:
        return _NOOP_SCOPE
    return _on.tracer.start_as_current_span(name, context=_context_of(traceparent_value),
                                            kind=_on.kinds["producer"], attributes=attributes)


def server(name: str, headers: Mapping[str, str], attributes: Mapping[str, Any] | None = None
           ) -> AbstractContextManager[Any]:
    """A span of a request served over HTTP, continuing the caller's trace (``traceparent``)."""
    if _on is None:
        return _NOOP_SCOPE
    return _on.tracer.start_as_current_span(name, context=_on.propagator.extract(headers),
                                            kind=_on.kinds["server"], attributes=attributes)


def grpc_metadata() -> list[tuple[str, str]] | None:
    """gRPC metadata carrying the current context (Triton makes its spans children of it)."""
    if _on is None:
        return None
    carrier: dict[str, str] = {}
    _on.propagator.inject(carrier)
    return list(carrier.items()) or None


# --- what fleet traces ------------------------------------------------------------------

def model_call(model: str, max_tokens: int | None) -> AbstractContextManager[Any]:
    """The span of a model call (OpenTelemetry's gen_ai conventions)."""
    if _on is None:
        return _NOOP_SCOPE
    return span(f"text_completion {model}", kind="client",
                attributes={"gen_ai.request.model": model, "gen_ai.request.max_tokens": max_tokens or 0})


def model_result(span_: Any, tokens_in: int, tokens_out: int, finish_reason: str | None,
                 ttft_s: float | None) -> None:
    """What a model call used, on its span (its duration is the span's)."""
    if _on is None or not span_.is_recording():
        return
    span_.set_attributes({
        "gen_ai.usage.input_tokens": tokens_in, "gen_ai.usage.output_tokens": tokens_out,
        "gen_ai.response.finish_reasons": [finish_reason or ""],
        "fleet.ttft_s": ttft_s if ttft_s is not None else -1.0})


def model_route(span_: Any, replica: str, reason: str, hit_blocks: int, prompt_blocks: int) -> None:
    """Where a model call went and why (fleet.inference.routing), on its span."""
    if _on is None or not span_.is_recording():
        return
    span_.set_attributes({"fleet.route.replica": replica, "fleet.route.reason": reason,
                          "fleet.route.expected_hit_blocks": hit_blocks, "fleet.route.prompt_blocks": prompt_blocks})


def tool_call(name: str) -> AbstractContextManager[Any]:
    """The span of a tool call."""
    if _on is None:
        return _NOOP_SCOPE
    return span(f"execute_tool {name}", attributes={"gen_ai.tool.name": name})
