"""A model call's prompt as messages: what the step says, independent of any model's format.

A step's prompt is a conversation (:class:`Prompt`): the agent's system text, the history it
carries (a session's earlier turns, a loop's earlier tool calls and their results), the step's
own user message, and the tools the model may call. How it reaches a model is the model's
prompt format's business (:mod:`fleet.inference.formats`): Mistral's chat format with its
control tokens for the medium model, a plain-text layout for the dev model.

The stable part comes first (system, tools, session turns), then the step's message, then what
changes within a run (a loop's tool calls): a prefix the engine has cached is reused whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the tool, its arguments (a JSON object), and an id that its
    result refers to."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One message of a conversation."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool message: the call it answers


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its name, what it does, and its parameters (JSON schema)."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    """What a model call asks, as messages.

    ``history`` comes before the step's message (a session's earlier turns), ``after`` after
    it (a loop's earlier tool calls and results, in order). ``history_placed`` and
    ``after_placed`` say the step's template already wrote them into its text (a template
    that places ``{session.transcript}`` or ``{loop.transcript}`` itself): a plain-text format
    then adds them nowhere else, and a chat format sends them as messages all the same.
    """

    user: str
    system: str | None = None
    bare_user: str | None = None  # the step's message with the templates' own transcripts left empty
    bare_system: str | None = None
    history: tuple[Message, ...] = ()
    after: tuple[Message, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    history_placed: bool = False
    after_placed: bool = False

    def messages(self) -> list[Message]:
        """The conversation, in order, as a chat format sends it (the history as messages)."""
        system = self.bare_system if self.bare_system is not None else self.system
        user = self.bare_user if self.bare_user is not None else self.user
        head = [Message("system", system)] if system else []
        return [*head, *self.history, Message("user", user), *self.after]


def call_id(*parts: Any) -> str:
    """A stable id for a tool call, from where it was made (the same call always gets the same
    id, so a re-sent prompt is the same prompt): nine letters and digits, as Mistral's format
    wants them."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    number = int(digest, 16)
    out = []
    for _ in range(9):
        number, i = divmod(number, len(alphabet))
        out.append(alphabet[i])
    return "".join(out)


@dataclass
class Rendered:
    """A prompt as one model takes it: its text, and its token ids when the model's tokenizer
    made them (sent beside the text, so the engine tokenizes nothing itself)."""

    text: str
    token_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
