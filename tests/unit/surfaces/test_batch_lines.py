"""Pure logic of batch jobs: line parsing, idempotency keys, ETA, the results file."""

from __future__ import annotations

import io
import json

import pytest

from fleet.surfaces.batch import (
    MAX_KEY_LENGTH,
    Progress,
    Summary,
    canonical_json,
    error_text,
    format_eta,
    idempotency_key,
    parse_line,
    read_input,
    read_results,
)


def test_a_plain_object_is_the_input():
    item = parse_line(3, '{"topic": "queues"}\n')
    assert (item.line, item.id, item.input, item.error) == (3, None, {"topic": "queues"}, None)


@pytest.mark.parametrize("text, line_id", [
    ('{"id": "row-17", "input": {"topic": "queues"}}', "row-17"),
    ('{"id": 17, "input": {"topic": "queues"}}', "17"),
    ('{"input": {"topic": "queues"}}', None),
])
def test_an_envelope_carries_id_and_input(text, line_id):
    item = parse_line(1, text)
    assert item.error is None and item.id == line_id and item.input == {"topic": "queues"}


def test_an_object_with_more_than_id_and_input_is_the_input_itself():
    # An agent whose input has a field named "input" still works: extra keys mean "not an envelope".
    item = parse_line(1, '{"input": {"a": 1}, "mode": "x"}')
    assert item.input == {"input": {"a": 1}, "mode": "x"} and item.id is None
    assert parse_line(1, '{"input": "text"}').input == {"input": "text"}


@pytest.mark.parametrize("text, fragment", [
    ('{"topic": "unterminated"', "not valid JSON"),
    ('["a", "list"]', "must be a JSON object, not list"),
    ('42', "not int"),
    ('{"id": [1], "input": {}}', "id must be a string or an integer"),
    ('{"id": true, "input": {}}', "id must be a string or an integer"),
])
def test_bad_lines_are_rejected_with_a_reason(text, fragment):
    item = parse_line(9, text)
    assert item.input is None and item.error is not None
    assert fragment in item.error and item.error.startswith("line 9:")


def test_key_from_id_is_stable_and_scoped_by_agent_and_batch():
    assert idempotency_key("writer", "row-1", {"topic": "a"}) == "batch:writer:id:row-1"
    # The id alone decides: the same id with another input is the same run.
    assert idempotency_key("writer", "row-1", {"topic": "b"}) == "batch:writer:id:row-1"
    assert idempotency_key("solver", "row-1", {}) != idempotency_key("writer", "row-1", {})
    assert idempotency_key("writer", "row-1", {}, "2024-05-01") == "batch:writer:2024-05-01:id:row-1"


def test_key_from_content_ignores_key_order_and_spacing():
    a = idempotency_key("writer", None, json.loads('{"topic": "a", "n": 1}'))
    b = idempotency_key("writer", None, json.loads('{ "n":1,"topic":"a" }'))
    c = idempotency_key("writer", None, {"topic": "b", "n": 1})
    assert a == b != c
    assert a.startswith("batch:writer:sha256:") and len(a.rsplit(":", 1)[1]) == 64
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


def test_keys_stay_within_admission_limit():
    long_id = "x" * 1000
    key = idempotency_key("writer", long_id, {})
    assert len(key) <= MAX_KEY_LENGTH and key.startswith("batch:writer:id-sha256:")
    assert key != idempotency_key("writer", long_id + "y", {})
    key = idempotency_key("writer", None, {"t": 1}, batch_id="b" * 300)
    assert len(key) <= MAX_KEY_LENGTH


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00"), (5.4, "0:05"), (59.6, "1:00"), (61, "1:01"), (3599, "59:59"),
    (3600, "1:00:00"), (3 * 3600 + 2 * 60 + 1, "3:02:01"),
    (None, "--:--"), (float("inf"), "--:--"), (float("nan"), "--:--"), (-1, "--:--"),
])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_read_results_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"line": 1, "status": "succeeded"}\n{"line": 3, "status": "rejected"}\n{"line": 2, "sta')
    assert read_results(out) == {1: "succeeded", 3: "rejected"}
    assert out.read_text().endswith('"rejected"}\n')  # the torn line is gone, the file appendable
    assert read_results(tmp_path / "absent.jsonl") == {}


def test_read_input_skips_blank_lines_but_keeps_numbers(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"topic": "a"}\n\n   \n{"topic": "b"}\n')
    assert [n for n, _ in read_input(src)] == [1, 4]


def test_error_text():
    assert error_text({"type": "RunCancelled", "message": "cancelled by request"}) == \
        "RunCancelled: cancelled by request"
    assert error_text(None) is None


def test_progress_reports_rate_and_eta_without_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=100, done=10, stream=stream, label="batch writer")
    progress._t0 -= 10.0  # ten seconds ago
    progress.update(30, in_flight=4, force=True)
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line  # a log, not a terminal: whole lines
    assert "batch writer: 30/100 done, 4 in flight, 2.0/s, ETA 0:35" in line


def test_summary_counts_and_completeness():
    s = Summary(total=10, skipped=4, written=6, created=5, resumed=1,
                statuses={"succeeded": 7, "rejected": 2, "cancelled": 1}, elapsed_s=12.5)
    d = s.as_dict()
    assert d["complete"] and d["done"] == 10
    assert (d["succeeded"], d["failed"], d["dead_lettered"], d["rejected"], d["expired"]) == (7, 0, 0, 2, 0)
    assert d["cancelled"] == 1
    assert "7 succeeded" in s.text() and "1 cancelled" in s.text() and "complete" in s.text()
    assert not Summary(total=3, skipped=1, written=1).complete
