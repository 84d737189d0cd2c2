"""Bad input anywhere gets a clear refusal naming where it is: the CLI, batch lines, HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from click.testing import CliRunner

from fleet.core.payload import MAX_DEPTH, check_value, parse_json
from fleet.errors import InvalidSubmission
from fleet.scheduling.submission import parse_submission
from fleet.settings import Settings
from fleet.surfaces.batch import parse_line
from fleet.surfaces.cli import main
from fleet.surfaces.gateway import create_gateway

DEEP = '{"q": ' + "[" * 5000 + "]" * 5000 + "}"
BAD = [
    ('{"q": "\\ud800"}', "q", "lone surrogate"),
    ('{"q": "a\\u0000b"}', "q", "NUL"),
    ('{"q": 1e999}', "q", "not finite"),
    ('{"q": -1e999}', "q", "not finite"),
    ('{"q": ' + "9" * 30 + "}", "q", "integer out of range"),
    ('{"q": ' + "9" * 5000 + "}", "", "not valid JSON"),
    ('{"q": ' + "[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2) + "}", "q.0.0", "nested too deeply"),
    (DEEP, "", "nested too deeply"),
    ('{"\\udfff": 1}', "", "lone surrogate"),
]


@pytest.mark.parametrize(("text", "where", "reason"), BAD)
def test_parse_json_refuses_what_the_fleet_cannot_carry(text, where, reason):
    with pytest.raises(InvalidSubmission, match=reason) as err:
        parse_json(text, "input")
    assert err.value.field.startswith(("input." + where) if where else "input")


def test_ordinary_values_pass_untouched():
    value = {"q": "héllo ✓", "n": [1, 2.5, -3, True, None], "deep": [[[[{"x": "y"}]]]]}
    assert parse_json(json.dumps(value), "input") == value
    check_value("x" * 100_000, "input")  # size is the byte limit's business, not this one's


def test_a_submission_names_the_field_of_a_bad_value():
    with pytest.raises(InvalidSubmission) as err:
        parse_submission({"agent": "calculator", "input": {"question": "a\x00"}})
    assert err.value.field == "input.question"


@pytest.mark.parametrize(("text", "where", "reason"), BAD)
def test_a_bad_batch_line_is_rejected_with_its_reason_not_raised(text, where, reason):
    parsed = parse_line(7, text)
    assert parsed.input is None and parsed.error.startswith("line 7: ") and reason in parsed.error


@pytest.mark.parametrize(("text", "where", "reason"), BAD[:3] + [(DEEP, "", "nested too deeply")])
def test_cli_submit_exits_2_naming_the_problem(text, where, reason):
    result = CliRunner().invoke(main, ["submit", "calculator", "--input", text, "--json"])
    assert result.exit_code == 2, result.output
    body = json.loads(result.output.strip().splitlines()[-1])
    assert reason in body["error"] and body["field"].startswith("input")


@pytest.mark.parametrize(("text", "where", "reason"), BAD[:4])
def test_gateway_answers_422_naming_the_field(text, where, reason):
    app = create_gateway(Settings(_env_file=None))
    app.state.services = None  # refused before any fleet is asked

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            body = '{"agent": "calculator", "input": ' + text + "}"
            return await client.post("/v1/runs", content=body, headers={"content-type": "application/json"})

    answer = asyncio.run(post())
    assert answer.status_code == 422 and reason in answer.json()["error"]
    assert answer.json()["field"] == "input." + where
