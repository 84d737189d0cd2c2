"""Batch jobs: push a JSONL file of inputs through the fleet at batch priority.

``fleet batch run INPUT.jsonl --agent writer --out RESULTS.jsonl`` reads one run input per
line and writes one result line per input line, as runs finish.

Input lines
    Each non-blank line is a JSON object. It is the agent's input as is
    (``{"topic": "queues"}``), unless it is an envelope: an object whose keys are ``input``
    (an object) and optionally ``id`` (a string or an integer), and nothing else
    (``{"id": "row-17", "input": {"topic": "queues"}}``). Blank lines are ignored; line
    numbers count every line of the file, from 1.

Result lines
    ``{"line": n, "id": ..., "run_id": ..., "status": ..., "output": ..., "error": ...,
    "dead_letter_id": ...}``. A line that is not valid JSON, or that admission rejects
    (unknown field, missing field, too long...), gets status ``rejected`` and the reason in
    ``error``: reported, never dropped. ``missing`` means the run's record had already been
    forgotten (``FLEET_RESULT_TTL_S``) when its result was wanted.

Never twice
    Every run is submitted with an idempotency key derived from the agent, the optional
    batch id, and the line's ``id`` (or the sha256 of its input as canonical JSON). A rerun
    skips the lines already in RESULTS.jsonl, and a line whose run was in flight when the
    job stopped gets the same run back from admission and waits for it: stopping and
    starting again never creates a second run. The same input file is expected on a rerun.

Submitting and collecting
    Lines are submitted in chunks through ``FleetClient.submit_many``: with the fleet's own
    scheduling the runs wait in the tenant's backlog, and the fleet's dispatcher feeds them to
    the model by fair share between tenants. By default every line is submitted up front;
    with ``max_in_flight`` at most that many runs are unfinished at once. When admission sheds
    load (:class:`~fleet.errors.Overloaded`) the job waits ``retry_after_s`` and tries again.
    Results are collected by reading, in one pipelined round trip, the statuses of the oldest
    unfinished runs (and of a rotating slice of the others).

Batch job
    The runs carry the job's id (``--batch-id``, or one made from the agent and the input
    file's content, so a rerun of the same file is the same job): ``fleet batch status`` and
    ``GET /v1/batches/{id}`` count its runs by status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

from fleet.core.payload import parse_json
from fleet.errors import IdempotencyConflict, InvalidSubmission, Overloaded
from fleet.run.records import TERMINAL, RunRecord
from fleet.scheduling.submission import Admitted
from fleet.surfaces.client import FleetClient

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 256  # admission's limit on idempotency keys
# Statuses the summary always names, in this order (others follow when they occur).
SUMMARY_STATUSES = ("succeeded", "failed", "dead_lettered", "rejected", "expired", "budget_exceeded")
SUBMIT_CHUNK = 1000  # lines per submit_many call
_POLL_HEAD = 1000  # oldest unfinished runs read each round
_POLL_SPREAD = 1000  # and a rotating slice of the others
_POLL_S = 0.2  # pause when a round found nothing ended


# --- pure logic --------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLine:
    """One parsed input line: an input to submit, or the reason it is rejected."""

    line: int
    id: str | None = None
    input: dict[str, Any] | None = None
    error: str | None = None


def parse_line(line: int, text: str) -> BatchLine:
    """Parse one input line (see the module docstring for the format)."""
    try:
        data = parse_json(text, "line")
    except InvalidSubmission as exc:
        # "line: not valid JSON ..." / "line.input.text: holds a NUL ..." -> "line 3: ..."
        where = str(exc).removeprefix("line").removeprefix(": ").removeprefix(".")
        return BatchLine(line, error=f"line {line}: {where}")
    if not isinstance(data, dict):
        return BatchLine(line, error=f"line {line}: a line must be a JSON object, not {type(data).__name__}")
    if isinstance(data.get("input"), dict) and set(data) <= {"id", "input"}:
        line_id = data.get("id")
        if line_id is not None and (isinstance(line_id, bool) or not isinstance(line_id, (str, int))):
            return BatchLine(line, error=f"line {line}: id must be a string or an integer")
        return BatchLine(line, id=None if line_id is None else str(line_id), input=data["input"])
    return BatchLine(line, input=data)


def canonical_json(value: Any) -> str:
    """JSON that does not depend on key order or spacing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def idempotency_key(agent: str, line_id: str | None, input: dict[str, Any], batch_id: str = "") -> str:
    """The key that makes a line's run unique: the same line never runs twice.

    From the line's ``id`` when it has one, else from the sha256 of its input as canonical
    JSON (so re-spacing a line does not make it new). ``batch_id`` separates batches that
    hold the same inputs (tonight's file and yesterday's).
    """
    scope = f"batch:{agent}:" + (f"{batch_id}:" if batch_id else "")
    if line_id is not None:
        key = f"{scope}id:{line_id}"
        if len(key) <= MAX_KEY_LENGTH:
            return key
        return f"{scope}id-sha256:{hashlib.sha256(line_id.encode()).hexdigest()}"
    digest = hashlib.sha256(canonical_json(input).encode()).hexdigest()
    key = f"{scope}sha256:{digest}"
    if len(key) > MAX_KEY_LENGTH:  # a very long batch id
        key = f"batch:{hashlib.sha256(scope.encode()).hexdigest()}:sha256:{digest}"
    return key


def format_eta(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``--:--`` when unknown."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return "--:--"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_results(path: Path) -> dict[int, str]:
    """Line number -> status of the results already written.

    A torn last line (the job was killed mid-write) is cut off, so its input line runs
    (once: its idempotency key) and is written again.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("results %s: cutting a torn last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done: dict[int, str] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            done[int(row["line"])] = str(row.get("status"))
        except (ValueError, KeyError, TypeError):
            log.warning("results %s: line %d is not a result line; ignored", path, number)
    return done


def read_input(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of the input file with their line numbers (from 1)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, text) for n, text in enumerate(f, 1) if text.strip()]


def error_text(error: dict[str, Any] | None) -> str | None:
    """A run's error as one line: ``Type: message``."""
    if not error:
        return None
    kind, message = error.get("type"), error.get("message")
    return f"{kind}: {message}" if kind else str(message)


# --- progress and summary --------------------------------------------------------------
class Progress:
    """``done/total``, rate and ETA on stderr: rewritten in place on a terminal, a line every
    few seconds otherwise (logs of a scheduled job)."""

    def __init__(self, total: int, done: int, stream: IO[str], label: str) -> None:
        self.total = total
        self.done = done
        self.stream = stream
        self.label = label
        self._start_done = done
        self._t0 = time.monotonic()
        self._shown = 0.0
        self._tty = hasattr(stream, "isatty") and stream.isatty()
        self._every_s = 0.2 if self._tty else 5.0

    def rate(self) -> float:
        """Results written per second by this invocation."""
        elapsed = time.monotonic() - self._t0
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self, in_flight: int) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.label}: {self.done}/{self.total} done, {in_flight} in flight, "
                f"{rate:.1f}/s, ETA {format_eta(eta)}")

    def update(self, done: int, in_flight: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self._shown < self._every_s:
            return
        self._shown = now
        if self._tty:
            self.stream.write("\r" + self.line(in_flight).ljust(79))
        else:
            self.stream.write(self.line(in_flight) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Summary:
    """What a batch invocation did, and where the whole batch stands."""

    total: int = 0
    skipped: int = 0            # already in the results file when this invocation started
    written: int = 0            # result lines written by this invocation
    created: int = 0            # new runs this invocation created
    resumed: int = 0            # runs that already existed for their key (picked up again)
    shed: int = 0               # submissions admission refused for load (each tried again)
    statuses: dict[str, int] = field(default_factory=dict)  # over the whole results file
    elapsed_s: float = 0.0
    interrupted: bool = False
    batch_id: str = ""          # the batch job the runs belong to (fleet batch status)

    @property
    def complete(self) -> bool:
        return self.skipped + self.written >= self.total

    def as_dict(self) -> dict[str, Any]:
        counts = {s: self.statuses.get(s, 0) for s in SUMMARY_STATUSES}
        counts.update({s: n for s, n in sorted(self.statuses.items()) if s not in counts})
        return {"total": self.total, "done": self.skipped + self.written, **counts,
                "skipped": self.skipped, "written": self.written, "created": self.created,
                "resumed": self.resumed, "shed": self.shed, "elapsed_s": round(self.elapsed_s, 3),
                "interrupted": self.interrupted, "complete": self.complete, "batch_id": self.batch_id}

    def text(self) -> str:
        d = self.as_dict()
        counts = ", ".join(f"{d[s]} {s}" for s in d if s in self.statuses or s in SUMMARY_STATUSES)
        state = "interrupted" if self.interrupted else ("complete" if self.complete else "incomplete")
        return (f"batch {self.batch_id} {state}: {d['done']}/{self.total} lines: {counts}; "
                f"this time {self.written} written ({self.created} new runs, {self.resumed} picked up, "
                f"{self.shed} times shed), "
                f"{self.skipped} already done; elapsed {format_eta(self.elapsed_s)}")


# --- the runner --------------------------------------------------------------------------
class _Interrupts:
    """Ctrl-C and SIGTERM stop the job, but never in the middle of a submission or a write.

    A signal inside a critical section is held until the section ends, so an interrupted
    job leaves neither a half-admitted run nor a half-written result line.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals are delivered to the main thread only
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending:
                self._pending = False
                raise KeyboardInterrupt


class BatchRunner:
    """Runs one input file through the fleet into one results file."""

    def __init__(self, client: FleetClient, agent: str, out: Path, *, max_in_flight: int | None = None,
                 deadline_s: float | None = None, batch_id: str = "",
                 progress_stream: IO[str] | None = None) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.client = client
        self.agent = agent
        self.out = out
        self.max_in_flight = max_in_flight
        self.deadline_s = deadline_s
        self.batch_id = batch_id
        self.job_id = batch_id or ""
        self.progress_stream = progress_stream if progress_stream is not None else sys.stderr
        self.store = client.store
        self._in_flight: dict[str, list[BatchLine]] = {}  # run id -> the lines it answers, oldest first
        self._cursor = 0
        self._statuses: dict[str, int] = {}
        self._summary = Summary()
        self._progress: Progress | None = None
        self._file: IO[str] | None = None
        self._interrupts = _Interrupts()

    # --- public -------------------------------------------------------------------
    def run(self, input_path: Path) -> Summary:
        """Run every line not yet in the results file. Ctrl-C stops cleanly (see Summary.interrupted)."""
        t0 = time.monotonic()
        lines = read_input(input_path)
        done = read_results(self.out)
        s = self._summary
        s.total = len(lines)
        self.job_id = s.batch_id = self.batch_id or job_id(self.agent, lines)
        for status in done.values():
            self._statuses[status] = self._statuses.get(status, 0) + 1
        pending = [(n, text) for n, text in lines if n not in done]
        s.skipped = s.total - len(pending)
        self._progress = Progress(s.total, s.skipped, self.progress_stream, f"batch {self.agent}")
        log.info("batch %s: %d lines, %d already done, %d to run", input_path, s.total, s.skipped, len(pending))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._interrupts.install()
        try:
            with open(self.out, "a", encoding="utf-8") as self._file:
                todo: deque[BatchLine] = deque()
                for n, text in pending:
                    item = parse_line(n, text)
                    if item.error is not None:
                        self._write_rejected(item, item.error)
                    else:
                        todo.append(item)
                while todo or self._in_flight:
                    room = len(todo) if self.max_in_flight is None else self.max_in_flight - len(self._in_flight)
                    if todo and room > 0:
                        chunk = [todo.popleft() for _ in range(min(room, SUBMIT_CHUNK, len(todo)))]
                        again, retry_after_s = self._submit(chunk)
                        if again:
                            todo.extendleft(reversed(again))
                            self._hold(retry_after_s)
                        continue
                    self._collect()
        except KeyboardInterrupt:
            s.interrupted = True
            log.info("batch %s: interrupted with %d runs in flight; a rerun picks them up",
                     input_path, len(self._in_flight))
        finally:
            self._interrupts.restore()
            self._file = None
            s.elapsed_s = time.monotonic() - t0
            s.statuses = dict(self._statuses)
            self._progress.update(s.skipped + s.written, len(self._in_flight), force=True)
            self._progress.close()
        return s

    # --- submitting -----------------------------------------------------------------
    def _submit(self, items: list[BatchLine]) -> tuple[list[BatchLine], float]:
        """Submit a chunk of lines in one call; the lines to submit again (shed) and when."""
        subs: list[dict[str, Any]] = []
        for item in items:
            assert item.input is not None  # noqa: S101 - rejected lines never get here
            subs.append({
                "agent": self.agent, "input": item.input, "priority": "batch", "deadline_s": self.deadline_s,
                "idempotency_key": idempotency_key(self.agent, item.id, item.input, self.batch_id),
            })
        try:
            # The call and the bookkeeping of its answer: an interrupt waits for both.
            with self._interrupts.critical():
                results = self.client.submit_many(subs, batch_id=self.job_id)
                return self._admitted(items, results)
        except Overloaded as exc:
            self._summary.shed += 1
            log.info("batch: %d lines shed by admission; retrying in %.1fs: %s", len(items), exc.retry_after_s, exc)
            return items, exc.retry_after_s

    def _admitted(self, items: list[BatchLine], results: list[Admitted]) -> tuple[list[BatchLine], float]:
        again: list[BatchLine] = []
        retry_after_s = 0.0
        for item, result in zip(items, results):
            if result.run_id is not None:
                if result.created:
                    self._summary.created += 1
                else:
                    self._summary.resumed += 1
                self._track(result.run_id, item)
            elif isinstance(result.error, (InvalidSubmission, IdempotencyConflict)):
                self._write_rejected(item, str(result.error))
            else:
                again.append(item)
                retry_after_s = max(retry_after_s, getattr(result.error, "retry_after_s", 1.0))
        if again:  # counted after the admitted ones: a reader of the summary sees them first
            self._summary.shed += 1
            log.info("batch: %d lines shed by admission; retrying in %.1fs", len(again), retry_after_s)
        return again, retry_after_s

    def _hold(self, seconds: float) -> None:
        """Wait ``seconds`` while still collecting finished runs."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self._in_flight:
                self._collect()
            else:
                time.sleep(max(0.0, min(until - time.monotonic(), _POLL_S)))

    def _track(self, run_id: str, item: BatchLine) -> None:
        if run_id in self._in_flight:  # two lines with the same input and no ids: one run
            self._in_flight[run_id].append(item)
            return
        self._in_flight[run_id] = [item]

    # --- collecting -----------------------------------------------------------------
    def _collect(self) -> None:
        """Read the statuses of the oldest runs in flight and of a rotating slice of the others
        (one round trip); write those that ended, or pause a moment when none did."""
        head = list(islice(self._in_flight, _POLL_HEAD))
        rest = len(self._in_flight) - len(head)
        spread: list[str] = []
        if rest > 0:
            self._cursor = self._cursor % rest
            spread = list(islice(self._in_flight, _POLL_HEAD + self._cursor,
                                 _POLL_HEAD + self._cursor + _POLL_SPREAD))
            self._cursor += _POLL_SPREAD
        ids = head + spread
        statuses = self.store.statuses(ids)
        ended = [r for r, status in zip(ids, statuses) if status is None or status in TERMINAL]
        if not ended:
            time.sleep(_POLL_S)
            return
        for run_id, record in zip(ended, self.store.get_many(ended)):
            lines = self._in_flight.get(run_id)
            if lines is None:
                continue
            if record is None:
                self._write_missing(run_id, self._in_flight.pop(run_id))
            elif record.status in TERMINAL:  # not reopened by a replay since
                self._write_run(record, self._in_flight.pop(run_id))

    # --- writing --------------------------------------------------------------------
    def _write(self, row: dict[str, Any]) -> None:
        assert self._file is not None
        # A whole line at once, outside the reach of Ctrl-C; a kill can still tear the last
        # line, which the next run cuts off (read_results).
        with self._interrupts.critical():
            self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
            status = row["status"]
            self._statuses[status] = self._statuses.get(status, 0) + 1
            self._summary.written += 1
        if self._progress is not None:
            self._progress.update(self._summary.skipped + self._summary.written, len(self._in_flight))

    def _write_rejected(self, item: BatchLine, error: str) -> None:
        log.info("batch: line %d rejected: %s", item.line, error)
        self._write({"line": item.line, "id": item.id, "run_id": None, "status": "rejected",
                     "output": None, "error": error, "dead_letter_id": None})

    def _write_run(self, record: RunRecord, items: list[BatchLine]) -> None:
        log.debug("run %s: %s, written for line(s) %s", record.id, record.status,
                  ", ".join(str(i.line) for i in items))
        for item in items:
            self._write({"line": item.line, "id": item.id, "run_id": record.id, "status": record.status,
                         "output": record.result, "error": error_text(record.error),
                         "dead_letter_id": record.dead_letter_id})

    def _write_missing(self, run_id: str, items: list[BatchLine]) -> None:
        log.warning("run %s: record no longer kept; line(s) %s written as missing", run_id,
                    ", ".join(str(i.line) for i in items))
        for item in items:
            self._write({"line": item.line, "id": item.id, "run_id": run_id, "status": "missing",
                         "output": None, "dead_letter_id": None,
                         "error": "the run's record is no longer kept (FLEET_RESULT_TTL_S); "
                                  "run the line again under a new --batch-id"})


def job_id(agent: str, lines: list[tuple[int, str]]) -> str:
    """The batch job id of an input file run without ``--batch-id``: from the agent and the
    file's lines, so the same file is the same job on a rerun."""
    digest = hashlib.sha256(agent.encode())
    for n, text in lines:
        digest.update(f"{n}:{text.strip()}\n".encode())
    return f"{agent}-{digest.hexdigest()[:16]}"


def run_batch(client: FleetClient, input_path: Path, agent: str, out: Path, *, max_in_flight: int | None = None,
              deadline_s: float | None = None, batch_id: str = "",
              progress_stream: IO[str] | None = None) -> Summary:
    """Run a JSONL file of inputs of ``agent`` through the fleet into ``out``; see the module doc."""
    runner = BatchRunner(client, agent, out, max_in_flight=max_in_flight, deadline_s=deadline_s,
                         batch_id=batch_id, progress_stream=progress_stream)
    return runner.run(input_path)

