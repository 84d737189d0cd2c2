"""Prompt formats: the medium model's Mistral chat format equals ``mistral-common``'s rendering of
the same messages and tools, its tool calls are read the way the model emits them, and the dev
model's plain-text layout keeps the lines the simulator reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from fleet.errors import PermanentError
from fleet.inference.formats import MistralFormat, TextFormat, build_format, parse_mistral_tool_calls
from fleet.run.messages import Message, Prompt, ToolCall
from fleet.run.tools import tool_spec
from fleet.settings import ModelSpec
from tests.support.tokenizer import v11_tekken


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return v11_tekken(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mistral(tekken: Path) -> MistralFormat:
    return MistralFormat(tekken)


def _conversation() -> Prompt:
    """A loop's third model call: system, a session turn, the question, two tool calls and results."""
    calls = [ToolCall("a1b2c3d4e", "calculator", {"expression": "17 + 4"}),
             ToolCall("f5g6h7i8j", "word_count", {"text": "seventeen plus four"})]
    return Prompt(
        system="You solve questions step by step.",
        history=(Message("user", "Hello"), Message("assistant", "Hi! What can I solve?")),
        user="Question: What is (17 + 4) * 3?",
        after=(Message("assistant", tool_calls=(calls[0],)), Message("tool", "21", tool_call_id=calls[0].id),
               Message("assistant", tool_calls=(calls[1],)), Message("tool", "3", tool_call_id=calls[1].id)),
        tools=(tool_spec("calculator"), tool_spec("word_count")),
    )


def _reference(tekken: Path) -> list[int]:
    """The same conversation written directly in mistral-common's own terms."""
    def call(id_: str, name: str, args: dict) -> AssistantMessage:
        return AssistantMessage(tool_calls=[MistralToolCall(id=id_, function=FunctionCall(name=name,
                                                                                          arguments=json.dumps(args)))])
    tools = [Tool(function=Function(name=name, description=tool_spec(name).description,
                                    parameters=tool_spec(name).parameters)) for name in ("calculator", "word_count")]
    request = ChatCompletionRequest(tools=tools, messages=[
        SystemMessage(content="You solve questions step by step."),
        UserMessage(content="Hello"), AssistantMessage(content="Hi! What can I solve?"),
        UserMessage(content="Question: What is (17 + 4) * 3?"),
        call("a1b2c3d4e", "calculator", {"expression": "17 + 4"}), ToolMessage(content="21", tool_call_id="a1b2c3d4e"),
        call("f5g6h7i8j", "word_count", {"text": "seventeen plus four"}),
        ToolMessage(content="3", tool_call_id="f5g6h7i8j"),
    ])
    return MistralTokenizer.from_file(str(tekken)).encode_chat_completion(request).tokens


def test_the_medium_models_rendering_equals_mistral_commons(mistral, tekken):
    rendered = mistral.render(_conversation())
    assert rendered.token_ids == _reference(tekken)
    text = rendered.text
    # Mistral's own layout, control tokens included: the system prompt, the tools, the turns.
    assert text.startswith("<s>[SYSTEM_PROMPT]You solve questions step by step.[/SYSTEM_PROMPT]")
    assert "[AVAILABLE_TOOLS]" in text and '"name": "calculator"' in text
    assert "[TOOL_CALLS]calculator[CALL_ID]a1b2c3d4e[ARGS]" in text and "[TOOL_RESULTS]a1b2c3d4e" in text
    assert mistral.count(rendered) == len(rendered.token_ids)


def test_a_tool_call_is_read_the_way_the_model_emits_it(mistral):
    # What the model generates for a call: encoded by mistral-common, decoded with its control
    # tokens kept (the format turns skip_special_tokens off for steps with tools).
    instruct = mistral.tokenizer.instruct_tokenizer
    tokens = instruct._encode_tool_calls_in_assistant_message(AssistantMessage(tool_calls=[
        MistralToolCall(id="zz9yy8xx7", function=FunctionCall(name="calculator", arguments='{"expression": "2 ^ 10"}'))]))
    emitted = mistral.tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP)
    assert mistral.parse_tool_call(emitted) == {"tool": "calculator", "input": "2 ^ 10",
                                                "arguments": {"expression": "2 ^ 10"}}
    assert parse_mistral_tool_calls('[TOOL_CALLS]word_count[ARGS]{"text": "a b"}[TOOL_CALLS]reverse[ARGS]{"text": "x"}') \
        == [("word_count", {"text": "a b"}), ("reverse", {"text": "x"})]
    assert parse_mistral_tool_calls('[TOOL_CALLS][{"name": "reverse", "arguments": {"text": "ab"}}]') == \
        [("reverse", {"text": "ab"})]  # the format of tokenizers before v11
    assert mistral.parse_tool_call("The answer is 63.</s>") == {"final": "The answer is 63."}
    with pytest.raises(PermanentError, match="not JSON"):
        mistral.parse_tool_call("[TOOL_CALLS]calculator[ARGS]{not json")
    assert mistral.sampling(_conversation()) == {"skip_special_tokens": False, "spaces_between_special_tokens": False}


def test_a_prompt_that_does_not_fit_the_format_is_a_permanent_error(mistral):
    # A tool result that answers no call: mistral-common refuses it, naming why.
    bad = Prompt(user="q", after=(Message("tool", "21", tool_call_id="nocall0001"),))
    with pytest.raises(PermanentError, match="Mistral's chat format"):
        mistral.render(bad)


def test_the_dev_models_text_layout():
    text = TextFormat().render(_conversation()).text
    assert text.splitlines() == [
        "You solve questions step by step.",
        'To use a tool, reply with a JSON object {"tool": NAME, "input": TEXT}; otherwise reply with the answer.',
        "Tools: calculator, word_count",
        "User: Hello",
        "Agent: Hi! What can I solve?",
        "User: Question: What is (17 + 4) * 3?",
        'Action: {"input": "17 + 4", "tool": "calculator"}',
        "Observation: 21",
        'Action: {"input": "seventeen plus four", "tool": "word_count"}',
        "Observation: 3",
        "Agent:",
    ]
    # A template that placed its history itself gets it nowhere else.
    placed = Prompt(user="Action: x\nQuestion: q", after=(Message("tool", "1", tool_call_id="a"),), after_placed=True)
    assert TextFormat().render(placed).text == "User: Action: x\nQuestion: q\nAgent:"
    assert TextFormat().count(TextFormat().render(placed)) is None  # estimated, no tokenizer


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('{"tool": "calculator", "input": "1 + 2"}', {"tool": "calculator", "input": "1 + 2"}),
        ('Sure: {"tool": "word_count", "input": 7} done', {"tool": "word_count", "input": "7"}),
        ("The answer is 3.", {"final": "The answer is 3."}),
        ('{"tool": 3}', {"final": '{"tool": 3}'}),
        ("{not json}", {"final": "{not json}"}),
    ],
)
def test_the_dev_models_tool_calls_are_json(text, parsed):
    assert TextFormat().parse_tool_call(text) == parsed


def test_a_model_declares_its_format(tekken, tmp_path):
    assert isinstance(build_format(ModelSpec(name="medium_sim")), TextFormat)
    assert isinstance(build_format(ModelSpec(name="medium", prompt_format="mistral", tokenizer=tekken)), MistralFormat)
    with pytest.raises(ValueError, match="tokenizer file"):
        build_format(ModelSpec(name="medium", prompt_format="mistral"))
    with pytest.raises(FileNotFoundError, match="tekken.json"):
        build_format(ModelSpec(name="medium", prompt_format="mistral", tokenizer=tmp_path / "tekken.json"))
