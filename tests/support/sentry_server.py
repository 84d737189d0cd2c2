"""A Sentry endpoint for tests: a small HTTP server that records the error events of the
envelopes it receives."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from .http_server import local_server


@dataclass
class SentryRecorder:
    """Error events received, and an Event set on each one."""

    dsn: str
    events: list[dict] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)
            self.arrived.set()

    def wait_for(self, predicate, enough=bool, timeout_s: float = 20.0) -> list[dict]:  # noqa: ANN001
        """Events matching ``predicate``, as soon as ``enough`` of them came (or when none more come)."""
        while True:
            with self.lock:
                found = [e for e in self.events if predicate(e)]
                self.arrived.clear()
            if enough(found) or not self.arrived.wait(timeout_s):
                return found


def tags_of(event: dict) -> dict:
    """An event's tags as a dict (Sentry sends a dict or a list of pairs)."""
    found = event.get("tags") or {}
    return dict(found) if isinstance(found, dict) else {k: v for k, v in found}


def _envelope_items(body: bytes) -> Iterator[tuple[dict, bytes]]:
    """(item header, payload) of each item of a Sentry envelope."""
    _, _, rest = body.partition(b"\n")  # the envelope header
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"]:]
            rest = rest[1:] if rest.startswith(b"\n") else rest
        else:
            payload, _, rest = rest.partition(b"\n")
        yield header, payload


def _decode(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli

        return brotli.decompress(body)
    return body


@contextmanager
def sentry_server() -> Iterator[SentryRecorder]:
    """A Sentry endpoint on a free loopback port; its DSN is ``recorder.dsn``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = _decode(self.rfile.read(int(self.headers["Content-Length"])),
                           self.headers.get("Content-Encoding"))
            for header, payload in _envelope_items(body):
                if header.get("type") == "event":
                    recorder.add(json.loads(payload))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    recorder = SentryRecorder("")
    with local_server(Handler, "sentry") as port:
        recorder.dsn = f"http://public@127.0.0.1:{port}/1"
        yield recorder
