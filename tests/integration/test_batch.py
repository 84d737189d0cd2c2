"""Batch jobs end to end: `fleet batch run` against this module's fleet, interrupted and resumed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.ops import launch
from fleet.surfaces.batch import BatchRunner

from .conftest import close_fleet, new_fleet

pytestmark = pytest.mark.integration

LINES = 300
# Line number (from 1) -> a line admission or the parser must reject.
BAD_LINES = {
    17: '{"topic": "an unterminated object"',               # not JSON
    60: '{"subject": "the field is called topic"}',        # missing field (and an unknown one)
    111: json.dumps({"topic": "x" * 501}),                 # over the writer's 500-character limit
    150: '["not", "an", "object"]',                        # not an object
    222: json.dumps({"id": "row-222", "input": {"topic": 7}}),  # wrong type
}


def _line(n: int) -> str:
    if n in BAD_LINES:
        return BAD_LINES[n]
    topic = f"batch topic {n}"
    if n % 10 == 0:  # some lines are envelopes with their own id
        return json.dumps({"id": f"row-{n}", "input": {"topic": topic}})
    return json.dumps({"topic": topic})


@pytest.fixture(scope="module")
def batch_fleet(fleet):
    # Capacity for a few hundred runs: a batch-only inference worker allowed more requests
    # in flight at Triton than the default fleet-wide batch cap.
    fleet.start_worker("inference-batch", "llm", "threads", 24, classes=("batch",),
                       FLEET_BATCH_INFLIGHT_MAX="48")
    return fleet


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _run_records(fleet) -> int:
    r, prefix = fleet.client.store.redis, fleet.settings.key("run", "")
    # Records only: <prefix>:run:<id>, not its events stream or delivery counters; and the
    # compact records of runs still waiting in the backlog.
    # compact records of runs still waiting in the backlog. Those first: a run dispatched
    # between the two scans is then seen twice (and counted once), never missed.
    queued = fleet.settings.keys.queued_run("")
    ids = {k[len(queued):] for k in r.scan_iter(queued + "*", count=1000)}
    ids |= {k[len(prefix):] for k in r.scan_iter(prefix + "*", count=1000) if ":" not in k[len(prefix):]}
    return len(ids)


def _batch_keys(fleet, agent: str) -> int:
    r = fleet.client.store.redis
    pattern = fleet.settings.keys.idempotency(fleet.client.caller.tenant, f"batch:{agent}:*")
    return sum(1 for _ in r.scan_iter(pattern, count=1000))


def test_interrupted_batch_resumes_without_running_anything_twice(batch_fleet, tmp_path):
    fleet = batch_fleet
    src, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(_line(n) + "\n" for n in range(1, LINES + 1)))
    valid = LINES - len(BAD_LINES)
    runs_before = _run_records(fleet)
    env = {**os.environ, **fleet.env}
    cmd = [sys.executable, "-m", "fleet.surfaces.cli", "batch", "run", str(src), "--agent", "writer",
           "--out", str(out), "--max-in-flight", "24", "--json"]
    # cwd away from the repository: no .fleet/stack.env of a local stack leaks in.
    first = subprocess.Popen(cmd, env=env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launch.wait_until(lambda: _count_lines(out) >= 60, 120, "first results", first, 0.02)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=30)
    assert first.returncode == 130, stderr
    summary1 = json.loads(stdout)
    assert summary1["interrupted"] is True and not summary1["complete"]
    done1 = _results(out)
    assert 60 <= len(done1) < LINES and summary1["written"] == len(done1)
    assert "done" in stderr and "/s" in stderr  # progress was reported
    created1 = _run_records(fleet) - runs_before
    assert summary1["created"] == created1
    with_run1 = sum(1 for r in done1 if r["run_id"] is not None)
    in_flight_at_stop = created1 - with_run1
    assert in_flight_at_stop > 0  # the job was stopped with runs in flight

    t0 = time.monotonic()
    second = subprocess.run(cmd, env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr
    summary2 = json.loads(second.stdout)
    resume_s = time.monotonic() - t0

    results = _results(out)
    numbers = [r["line"] for r in results]
    assert len(numbers) == len(set(numbers)) == LINES  # one result per line, none twice
    assert set(numbers) == set(range(1, LINES + 1))
    assert results[:len(done1)] == done1  # what was written stays
    assert summary2["skipped"] == len(done1) and summary2["written"] == LINES - len(done1)
    # Runs in flight at the stop were picked up through their keys, not submitted again.
    assert summary2["resumed"] == in_flight_at_stop
    assert summary2["created"] == valid - created1
    assert _run_records(fleet) - runs_before == valid
    assert _batch_keys(fleet, "writer") == valid

    by_line = {r["line"]: r for r in results}
    for n, line in BAD_LINES.items():
        row = by_line[n]
        assert row["status"] == "rejected" and row["run_id"] is None and row["error"], row
    assert "not valid JSON" in by_line[17]["error"]
    assert "input.topic" in by_line[60]["error"] and "input.topic" in by_line[111]["error"]
    assert "must be a JSON object" in by_line[150]["error"]
    assert by_line[222]["id"] == "row-222" and "input.topic" in by_line[222]["error"]
    good = [r for n, r in by_line.items() if n not in BAD_LINES]
    assert all(r["status"] == "succeeded" and isinstance(r["output"], str) and r["output"] for r in good)
    assert all(r["error"] is None and r["dead_letter_id"] is None for r in good)
    assert by_line[30]["id"] == "row-30" and by_line[31]["id"] is None
    assert len({r["run_id"] for r in good}) == valid
    assert fleet.client.get(by_line[30]["run_id"]).priority == "batch"
    assert fleet.client.get(by_line[31]["run_id"]).input == {"topic": "batch topic 31"}
    assert summary2 | {"elapsed_s": 0} == summary2 | {
        "total": LINES, "done": LINES, "succeeded": valid, "failed": 0, "dead_lettered": 0,
        "rejected": len(BAD_LINES), "expired": 0, "interrupted": False, "complete": True, "elapsed_s": 0}
    assert resume_s < 120

    # A third run finds everything done: nothing submitted, nothing written.
    third = subprocess.run(cmd, env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and json.loads(third.stdout)["written"] == 0
    assert _results(out) == results


def test_in_flight_limit_deadline_and_shedding_are_honoured(redis_url, triton, session_dir, tmp_path):
    # Real shedding: admission refuses batch runs while 2 model steps wait in the batch
    # queue, and at first no inference worker takes them.
    fleet = new_fleet(redis_url, triton, session_dir, "s", admission_batch_max_queued=2)
    try:
        fleet.start_worker("tools", "tool", "prefork", 2)
        src, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
        topics = [f"limited topic {i}" for i in range(12)]
        lines = [json.dumps({"topic": t}) for t in topics] + [json.dumps({"topic": topics[0]})]  # one repeat
        src.write_text("\n".join(lines) + "\n")
        progress = io.StringIO()
        runner = BatchRunner(fleet.client, "writer", out, max_in_flight=3, deadline_s=600,
                             batch_id="limits", progress_stream=progress)
        result: list = []
        job = threading.Thread(target=lambda: result.append(runner.run(src)), name="batch")
        job.start()
        launch.wait_until(lambda: runner._summary.shed >= 1 or not job.is_alive(), 60, "a shed submission")
        queued_when_shed = runner._summary.created
        fleet.start_worker("inference", "llm", "threads", 8)
        job.join(timeout=240)
        assert not job.is_alive(), progress.getvalue()[-500:]
        [summary] = result
        rows = _results(out)
        runs = [fleet.client.get(r["run_id"]) for r in rows if r["line"] != 13]
    finally:
        close_fleet(fleet)

    assert summary.shed >= 1 and queued_when_shed == 2  # refused at the third, while two waited
    assert summary.statuses == {"succeeded": 13} and summary.complete and not summary.interrupted
    assert summary.created == 12 and summary.resumed == 1  # the repeated line shares its run
    assert sorted(r["line"] for r in rows) == list(range(1, 14))
    by_line = {r["line"]: r for r in rows}
    assert by_line[13]["run_id"] == by_line[1]["run_id"]
    assert all(abs((r.deadline_at - r.created_at) - 600) < 1 and r.priority == "batch" for r in runs)
    # Never more than 3 unfinished at once: at each submission, count the runs alive then.
    for run in runs:
        alive = sum(1 for o in runs if o.created_at <= run.created_at < o.finished_at)
        assert alive <= 3, (run.id, alive)
    assert "13/13 done" in progress.getvalue()
