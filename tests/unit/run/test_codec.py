"""A backlog run's compact record: what it keeps, and that it reads back as the run."""

from __future__ import annotations

import json

from fleet.run.codec import compact, from_compact, hash_fields
from fleet.run.records import RunRecord
from fleet.run.state import decode_record
from fleet.surfaces.batch import job_id


def _record(**extra) -> RunRecord:
    return RunRecord(id="a" * 32, agent="writer", priority="batch", tenant="acme", status="queued",
                     created_at=1764720000.1234, deadline_at=1764806400.5, input={"topic": "queues", "n": 3},
                     **extra)


def test_a_compact_record_reads_back_as_the_queued_run():
    full = _record(idempotency_key="batch:writer:id:7", batch="nightly", stream=True, budget_tokens=500,
                   budget_cost=0.25, session_id="s1", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    back = decode_record(from_compact(full.id, compact(full)))
    assert back.model_dump() == {**full.model_dump(), "created_at": 1764720000.123, "deadline_at": 1764806400.5}


def test_a_compact_record_is_short_and_leaves_out_what_is_unset():
    record = _record()
    text = compact(record)
    assert json.loads(text) == ["writer", "acme", 1764720000.123, 1764806400.5, {"topic": "queues", "n": 3}, None,
                                None, 0]
    assert len(text) < len(json.dumps(hash_fields(record)))
    back = decode_record(from_compact(record.id, text))
    assert (back.status, back.priority, back.batch, back.budget_tokens, back.session) == ("queued", "batch", None,
                                                                                          None, [])


def test_a_batch_job_id_is_the_same_for_the_same_file_and_agent():
    lines = [(1, '{"topic": "a"}\n'), (3, '{"topic": "b"}\n')]
    assert job_id("writer", lines) == job_id("writer", [(1, '{"topic": "a"}'), (3, '{"topic": "b"}')])
    assert job_id("writer", lines) != job_id("writer", lines[:1])
    assert job_id("writer", lines) != job_id("solver", lines)
    assert job_id("writer", lines).startswith("writer-")
