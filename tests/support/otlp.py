"""A real OTLP/HTTP trace receiver for tests: ``POST /v1/traces`` bodies (protobuf from the
Python SDK, JSON from Triton's exporter) decoded with the OpenTelemetry protobufs, kept as
plain :class:`Span` records."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .http_server import local_server

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON (what Triton's exporter sends): ids are hex there, where protobuf's JSON
    mapping expects base64."""
    data = json.loads(body)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in [span, *span.get("links", [])]:
                    for name in _ID_FIELDS:
                        if item.get(name):
                            item[name] = base64.b64encode(bytes.fromhex(item[name])).decode()
    return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class Span:
    """One received span, ids as hex."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    service: str
    attributes: dict[str, Any]
    events: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    status_code: int  # 0 unset, 1 ok, 2 error


@dataclass
class OtlpReceiver:
    """Spans received so far; ``endpoint`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    endpoint: str = ""
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, body: bytes, json_body: bool = False) -> None:
        req = _from_json(body) if json_body else ExportTraceServiceRequest.FromString(body)
        got: list[Span] = []
        for rs in req.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                        name=s.name, kind=s.kind, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        service=str(res.get("service.name", "")),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        events=tuple(e.name for e in s.events),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        status_code=s.status.code,
                    ))
        with self._cond:
            self.requests += 1
            self.spans.extend(got)
            self._cond.notify_all()

    def wait_for(self, done: Callable[[list[Span]], bool], timeout_s: float = 30.0) -> list[Span]:
        """Every span received, once ``done(spans)`` holds (or the last ones when it never does)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)  # woken by every export that arrives
            return list(self.spans)

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver on a free loopback port, stopped afterwards."""
    receiver = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: exporters reuse their connection

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path.rstrip("/") == "/v1/traces":
                receiver.add(body, json_body="json" in (self.headers.get("Content-Type") or ""))
                reply, code = ExportTraceServiceResponse().SerializeToString(), 200
            else:
                reply, code = b"", 404
            self.send_response(code)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    with local_server(Handler, "otlp-receiver") as port:
        receiver.endpoint = f"http://127.0.0.1:{port}"
        yield receiver
