"""Prompt formats: how a served model takes a prompt's messages, and how it calls tools.

Each served model declares its format (:class:`fleet.settings.ModelSpec`, ``prompt_format``):

- ``mistral``: Mistral's chat format, rendered by ``mistral-common`` with the model's own
  tokenizer file (``[SYSTEM_PROMPT]``, ``[INST]`` turns, ``[AVAILABLE_TOOLS]``, tool calls as
  ``[TOOL_CALLS]name[ARGS]{...}`` and results as ``[TOOL_RESULTS]``). The prompt goes to the
  engine as token ids (``prompt_token_ids``): Triton's vLLM backend takes text only, and in
  Mistral's tokenizer mode vLLM encodes text without control tokens, so text carrying ``[INST]``
  would reach the model as plain words (see ``triton_models/README.md``). The text goes along
  for logs and traces. Token counts are the tokenizer's. A tool call is read the way the model
  emits it (its control tokens kept in the output: ``skip_special_tokens`` off).
- ``text``: the dev model's plain-text layout (the simulator reads its lines), with tool calls
  as a JSON object ``{"tool": ..., "input": ...}``:

  ::

      <system>
      To use a tool, reply with a JSON object {"tool": NAME, "input": TEXT}; otherwise reply with the answer.
      Tools: calculator, word_count
      User: <an earlier turn of the session>
      Agent: <the agent's reply>
      User: <the step's message>
      Action: {"input": "...", "tool": "calculator"}
      Observation: <the tool's result>
      Agent:

  Token counts are estimated (:mod:`fleet.run.budget`).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from fleet.errors import PermanentError
from fleet.run.messages import Message, Prompt, Rendered, ToolSpec
from fleet.run.template import as_text
from fleet.run.tools import tool_input
from fleet.settings import ModelSpec, Settings

TOOL_INSTRUCTION = 'To use a tool, reply with a JSON object {"tool": NAME, "input": TEXT}; otherwise reply with the answer.'


class PromptFormat:
    """How one model takes prompts and gives tool calls."""

    name = "abstract"

    def render(self, prompt: Prompt) -> Rendered:
        raise NotImplementedError

    def sampling(self, prompt: Prompt) -> dict[str, Any]:
        """Sampling parameters the format needs for this prompt (besides the step's own)."""
        return {}

    def parse_tool_call(self, text: str) -> dict[str, Any]:
        """A model output as a tool call ``{tool, input, arguments}``, or ``{final}`` when it is not one."""
        raise NotImplementedError

    def parse_tool_calls(self, text: str) -> dict[str, Any]:
        """A model output as every tool call it holds ``{calls: [{tool, input, arguments}, ...]}``,
        or ``{final}`` when it holds none."""
        call = self.parse_tool_call(text)
        return call if "final" in call else {"calls": [call]}

    def count(self, rendered: Rendered) -> int | None:
        """The prompt's tokens as the model counts them, when this format knows (None: estimate)."""
        return len(rendered.token_ids) if rendered.token_ids is not None else None


class TextFormat(PromptFormat):
    """The dev model's plain-text layout (see the module docstring)."""

    name = "text"

    def render(self, prompt: Prompt) -> Rendered:
        lines: list[str] = []
        if prompt.system:
            lines.append(prompt.system)
        if prompt.tools:
            lines += [TOOL_INSTRUCTION, "Tools: " + ", ".join(t.name for t in prompt.tools)]
        if not prompt.history_placed:
            lines += [_line(m) for m in prompt.history]
        lines.append(f"User: {prompt.user}")
        if not prompt.after_placed:
            lines += [_line(m) for m in prompt.after]
        lines.append("Agent:")
        return Rendered("\n".join(lines))

    def parse_tool_call(self, text: str) -> dict[str, Any]:
        start, end = text.find("{"), text.rfind("}")
        if start != -1 and end > start:
            try:
                call = json.loads(text[start: end + 1])
            except ValueError:
                call = None
            if isinstance(call, dict) and isinstance(call.get("tool"), str) and "input" in call:
                return {"tool": call["tool"], "input": as_text(call["input"])}
        return {"final": text.strip()}

    def parse_tool_calls(self, text: str) -> dict[str, Any]:
        start, end = text.find("["), text.rfind("]")
        if start != -1 and end > start and text.lstrip().startswith("["):
            try:
                calls = json.loads(text[start: end + 1])
            except ValueError:
                calls = None
            if isinstance(calls, list) and calls and all(
                    isinstance(c, dict) and isinstance(c.get("tool"), str) and "input" in c for c in calls):
                return {"calls": [{"tool": c["tool"], "input": as_text(c["input"])} for c in calls]}
        return super().parse_tool_calls(text)


def _line(message: Message) -> str:
    if message.role == "user":
        return f"User: {message.content}"
    if message.role == "tool":
        return f"Observation: {message.content}"
    if message.tool_calls:
        call = message.tool_calls[0]
        return "Action: " + json.dumps({"tool": call.name, "input": tool_input(call.name, call.arguments)},
                                       sort_keys=True)
    return f"Agent: {message.content}"


# [TOOL_CALLS]name[ARGS]{...} (tokenizers v11 and later, [CALL_ID]id between when present),
# or [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (earlier ones).
_CALL_V11 = re.compile(r"\[TOOL_CALLS\]\s*([^\[\s]+?)\s*(?:\[CALL_ID\]\s*(\S+?)\s*)?\[ARGS\]", re.S)


class MistralFormat(PromptFormat):
    """Mistral's chat format, rendered by ``mistral-common`` with the model's tokenizer file."""

    name = "mistral"

    def __init__(self, tokenizer_file: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if not tokenizer_file.exists():
            raise FileNotFoundError(f"the model's tokenizer file {tokenizer_file} does not exist "
                                    "(mount the model's tekken.json and name it in FLEET_MODELS)")
        self.tokenizer = MistralTokenizer.from_file(str(tokenizer_file))

    def request(self, prompt: Prompt) -> Any:
        """The prompt as ``mistral-common``'s chat completion request."""
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

        messages: list[Any] = []
        for m in prompt.messages():
            if m.role == "system":
                messages.append(SystemMessage(content=m.content))
            elif m.role == "user":
                messages.append(UserMessage(content=m.content))
            elif m.role == "tool":
                messages.append(ToolMessage(content=m.content, tool_call_id=m.tool_call_id))
            elif m.tool_calls:
                messages.append(AssistantMessage(tool_calls=[
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments)))
                    for c in m.tool_calls]))
            else:
                messages.append(AssistantMessage(content=m.content))
        tools = [Tool(function=Function(name=t.name, description=t.description, parameters=t.parameters))
                 for t in prompt.tools]
        return ChatCompletionRequest(messages=messages, tools=tools or None)

    def render(self, prompt: Prompt) -> Rendered:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        try:
            tokens = list(self.tokenizer.encode_chat_completion(self.request(prompt)).tokens)
        except Exception as exc:  # mistral-common's validation names what is wrong
            raise PermanentError(f"the prompt does not fit Mistral's chat format: {exc}") from None
        return Rendered(self.tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP), tokens)

    def sampling(self, prompt: Prompt) -> dict[str, Any]:
        # A tool call is read from the control tokens around it: keep them in the text.
        return {"skip_special_tokens": False, "spaces_between_special_tokens": False} if prompt.tools else {}

    def parse_tool_call(self, text: str) -> dict[str, Any]:
        calls = parse_mistral_tool_calls(text)
        if not calls:
            return {"final": _strip_controls(text)}
        name, arguments = calls[0]
        return {"tool": name, "input": tool_input(name, arguments) if isinstance(arguments, dict) else str(arguments),
                "arguments": arguments}

    def parse_tool_calls(self, text: str) -> dict[str, Any]:
        calls = parse_mistral_tool_calls(text)
        if not calls:
            return {"final": _strip_controls(text)}
        return {"calls": [{"tool": name, "arguments": arguments,
                           "input": tool_input(name, arguments) if isinstance(arguments, dict) else str(arguments)}
                          for name, arguments in calls]}


def _strip_controls(text: str) -> str:
    return re.sub(r"</?s>|\[/?[A-Z_]+\]", "", text).strip()


def parse_mistral_tool_calls(text: str) -> list[tuple[str, Any]]:
    """The tool calls in a Mistral model's output, as ``(name, arguments)``, in order."""
    calls: list[tuple[str, Any]] = []
    matches = list(_CALL_V11.finditer(text))
    if matches:
        decoder = json.JSONDecoder()
        for match in matches:
            try:
                arguments, _ = decoder.raw_decode(text[match.end():].lstrip())
            except ValueError:
                raise PermanentError(f"the model called {match.group(1)} with arguments that are not JSON: "
                                     f"{text[match.end():match.end() + 200]!r}") from None
            calls.append((match.group(1), arguments))
        return calls
    at = text.find("[TOOL_CALLS]")
    if at >= 0:  # the format of tokenizers before v11: a JSON list after the control token
        try:
            listed = json.JSONDecoder().raw_decode(text[at + len("[TOOL_CALLS]"):].lstrip())[0]
        except ValueError:
            raise PermanentError(f"the model's tool calls are not JSON: {text[at:at + 200]!r}") from None
        for call in listed if isinstance(listed, list) else [listed]:
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                calls.append((call["name"], call.get("arguments", {})))
    return calls


class Formats:
    """The prompt format of each served model, built once per process (a tokenizer file is
    read once)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._built: dict[str, PromptFormat] = {}
        self._lock = threading.Lock()

    def of(self, model: str) -> PromptFormat:
        with self._lock:
            found = self._built.get(model)
            if found is None:
                found = self._built[model] = build_format(self.settings.model_spec(model))
            return found


def build_format(spec: ModelSpec) -> PromptFormat:
    """The format a model declares."""
    if spec.prompt_format == "mistral":
        if spec.tokenizer is None:
            raise ValueError(f"model {spec.name}: the mistral prompt format needs its tokenizer file "
                             "(tokenizer in FLEET_MODELS)")
        return MistralFormat(spec.tokenizer)
    return TextFormat()


__all__ = ["Formats", "MistralFormat", "PromptFormat", "TextFormat", "ToolSpec", "build_format",
           "parse_mistral_tool_calls"]
