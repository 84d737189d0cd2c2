"""Agents as data: a declarative definition of named steps, validated when loaded.

An agent is a TOML file::

    name = "calculator"
    description = "..."
    system = "You answer questions ..."    # the system message of every model call (optional)
    result = "answer"                      # the step whose output is the run's result
    [inputs.question]
    type = "string"
    max_length = 2000
    [example]
    question = "What is 12 * 7 + 3?"
    [[steps]]
    name = "plan"
    kind = "llm"                           # llm | tool | loop | parallel | wait
    prompt = "Question: {input.question}"  # the user message: {input.X}, {steps.NAME[.FIELD]}
    tools = ["calculator", "word_count"]   # tools the model may call (sent in its own format)
    parse = "tool_call"                    # the output is a tool call, or a final answer
    max_tokens = 32

A step's prompt is a conversation (:mod:`fleet.run.prompting`): the agent's ``system`` text,
the session's earlier turns, the step's ``prompt`` as the user message, and inside a loop the
earlier iterations' tool calls and results; the served model's format lays it out
(:mod:`fleet.inference.formats`). A template may still place ``{session.transcript}`` or
``{loop.transcript}`` itself (plain-text formats then add that history nowhere else).
A ``loop`` step repeats its ``body`` (llm and tool steps) at most ``max_iterations``
times, ending early when the step named by ``until`` produces a ``final`` answer. Each
iteration is its own short chain, so a long loop never becomes one giant Celery chain.

A ``parallel`` step runs branches at once: fixed ``branches`` (llm and tool steps), or one
``branch`` step for each item of a list an earlier step produced (``over``: a path such as
``plan.calls``; the branch sees ``{branch.item}`` and ``{branch.index}``, and a tool branch may
take the item as its tool call with ``tool_from = "item"``), at most ``max_concurrency`` at a
time. Its output, once every branch committed, is the list of the branches' outputs (a table by
branch name for fixed branches). ``on_failure = "keep"`` keeps what succeeded (a failed branch's
output is ``{"error": ...}``); ``"fail"`` (the default) fails the run with its first failed branch.
A ``wait`` step parks the run, holding no worker, until the signal ``signal`` arrives (its
output is the signal's payload) or ``timeout_s`` passes (``on_timeout``: ``"fail"`` ends the
run failed, ``"continue"`` goes on with the output ``{"timed_out": true}``).

A ``[budget]`` table (``tokens``, ``cost``) bounds what one run's model calls may use,
unless a submission sets its own (:mod:`fleet.run.budget`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, model_validator

from fleet.errors import FleetError, InvalidSubmission
from fleet.run.budget import Budget
from fleet.run.template import PLACEHOLDER

MAX_LOOP_ITERATIONS = 50


class AgentDefinitionError(FleetError):
    """An agent definition is invalid; the message names the agent and the step."""


class InputField(BaseModel):
    """One field of an agent's input."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "integer", "number", "boolean"] = "string"
    description: str = ""
    required: bool = True
    default: Any = None
    max_length: int | None = Field(None, gt=0)


class _StepBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    transcript_label: str | None = Field(
        None, description="Label of this step's output in {loop.transcript} lines."
    )


class LlmStep(_StepBase):
    """A model call: a prompt template rendered from the run state, sent to Triton."""

    kind: Literal["llm"]
    prompt: str
    model: str | None = Field(None, description="A model of the fleet's catalog, or a role FLEET_MODEL_ROLES maps "
                              "to one; the fleet's default when unset.")
    fallback: str | None = Field(None, description="A model or role the call runs on when the step's model has "
                                 "no replica up or its predicted wait would miss the run's deadline.")
    max_tokens: int = Field(64, gt=0, le=8192)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="Further sampling parameters passed to the backend as is."
    )
    parse: Literal["text", "tool_call", "tool_calls"] = Field(
        "text",
        description="tool_call: the output is a call of one of the step's tools or, when it is not, a final answer; "
        "tool_calls: every call the model asked for at once, as {calls: [...]} (a parallel step maps over "
        "'NAME.calls'), or a final answer.",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="Tools the model may call: their definitions go with the prompt, in the model's own "
        "format (Mistral's native tool calls for the medium model).",
    )

    def sampling_parameters(self) -> dict[str, Any]:
        """vLLM sampling parameters of this step."""
        params: dict[str, Any] = {
            **self.sampling,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.stop:
            params["stop"] = self.stop
        return params


class ToolStep(_StepBase):
    """A registered Python tool, with a fixed input or one chosen from a model's output."""

    kind: Literal["tool"]
    tool: str | None = Field(None, description="Tool to run; exclusive with tool_from.")
    input: str | None = Field(None, description="Template of the tool's input.")
    tool_from: str | None = Field(
        None, description="An llm step with parse='tool_call' whose output picks tool and input."
    )
    allowed_tools: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "ToolStep":
        if (self.tool is None) == (self.tool_from is None):
            raise ValueError("set exactly one of 'tool' and 'tool_from'")
        if self.tool is not None and self.input is None:
            raise ValueError("a step with 'tool' needs an 'input' template")
        return self


BodyStep = Annotated[Union[LlmStep, ToolStep], Field(discriminator="kind")]


MAX_BRANCHES = 256


class ParallelStep(_StepBase):
    """Branches run at once, joined when every one of them committed (see the module docstring)."""

    kind: Literal["parallel"]
    branches: list[BodyStep] = Field(default_factory=list, description="Fixed branches, each a step.")
    over: str | None = Field(None, description="A list an earlier step produced (e.g. 'plan.calls'): one "
                             "branch per item.")
    branch: BodyStep | None = Field(None, description="The step each item of 'over' runs.")
    max_concurrency: int = Field(8, gt=0, le=MAX_BRANCHES, description="Most branches running at a time.")
    on_failure: Literal["fail", "keep"] = Field(
        "fail", description="fail: a failed branch fails the run; keep: the join keeps what succeeded.")

    @model_validator(mode="after")
    def _one_shape(self) -> "ParallelStep":
        if bool(self.branches) == (self.over is not None):
            raise ValueError("set exactly one of 'branches' and 'over'")
        if (self.over is None) != (self.branch is None):
            raise ValueError("'over' and 'branch' go together")
        if len(self.branches) > MAX_BRANCHES:
            raise ValueError(f"at most {MAX_BRANCHES} branches")
        return self

    def branch_step(self, index: int) -> LlmStep | ToolStep:
        """The step branch ``index`` (from 1) runs."""
        if self.branch is not None:
            return self.branch
        return self.branches[index - 1]

    @property
    def branch_names(self) -> list[str] | None:
        """The names of fixed branches (the keys of the join's output); None for a map."""
        return [b.name for b in self.branches] if self.branches else None


class WaitStep(_StepBase):
    """The run parks until a signal arrives or a timeout passes, holding no worker."""

    kind: Literal["wait"]
    signal: str = Field(pattern=r"^[a-z][a-z0-9_.-]*$", description="The name of the signal it waits for.")
    timeout_s: float = Field(3600.0, gt=0, description="How long it waits before on_timeout applies.")
    on_timeout: Literal["fail", "continue"] = Field(
        "fail", description="fail: the run fails; continue: it goes on with the output {\"timed_out\": true}.")


class LoopStep(_StepBase):
    """A bounded loop over a body of steps (plan -> act -> observe, repeated)."""

    kind: Literal["loop"]
    body: list[BodyStep] = Field(min_length=1)
    max_iterations: int = Field(gt=0, le=MAX_LOOP_ITERATIONS)
    until: str = Field(description="A body llm step with parse='tool_call'; its final answer ends the loop.")


Step = Annotated[Union[LlmStep, ToolStep, LoopStep, ParallelStep, WaitStep], Field(discriminator="kind")]
#: Steps that travel as no single message: a fan-out of branches, a parked wait.
Shaped = (ParallelStep, WaitStep)


class AgentDef(BaseModel):
    """A validated agent definition."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    description: str = ""
    system: str = Field("", description="The agent's instructions: the system message of its model calls "
                        "(a template, like a step's prompt).")
    inputs: dict[str, InputField] = Field(default_factory=dict)
    example: dict[str, Any] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    result: str
    budget: Budget = Field(default_factory=Budget, description="A run's default budget (fleet.run.budget).")
    _input_model: type[BaseModel] | None = PrivateAttr(None)

    def iter_steps(self) -> Iterator[tuple[LlmStep | ToolStep, LoopStep | None]]:
        """Every executable step in order, with the loop it belongs to (or None); parallel and
        wait steps are not among them (see :meth:`shaped` and :meth:`step_at`)."""
        for step in self.steps:
            if isinstance(step, LoopStep):
                for inner in step.body:
                    yield inner, step
            elif not isinstance(step, Shaped):
                yield step, None

    def iter_steps_with_branches(self) -> Iterator[tuple[LlmStep | ToolStep, LoopStep | None]]:
        """:meth:`iter_steps`, and the branch steps of parallel steps (with no loop)."""
        for step in self.steps:
            if isinstance(step, ParallelStep):
                for body in step.branches or [step.branch]:  # type: ignore[list-item]
                    yield body, None
            elif isinstance(step, LoopStep):
                for inner in step.body:
                    yield inner, step
            elif not isinstance(step, Shaped):
                yield step, None

    def shaped(self, name: str) -> ParallelStep | WaitStep | None:
        """The parallel or wait step of that name, if it is one."""
        for step in self.steps:
            if step.name == name and isinstance(step, Shaped):
                return step
        return None

    def step_at(self, name: str, iteration: int) -> LlmStep | ToolStep:
        """What the message of step ``name`` in ``iteration`` runs: the step, or the branch
        ``iteration`` of a parallel step. Raises KeyError when there is none."""
        top = self.shaped(name)
        if isinstance(top, ParallelStep):
            if iteration < 1 or (top.branches and iteration > len(top.branches)):
                raise KeyError(f"{name}#{iteration}")
            return top.branch_step(iteration)
        if top is not None:
            raise KeyError(name)
        return self.step(name)

    def step(self, name: str) -> LlmStep | ToolStep:
        """The executable step of that name."""
        for step, _ in self.iter_steps():
            if step.name == name:
                return step
        raise KeyError(name)

    def loop_of(self, name: str) -> LoopStep | None:
        """The loop a step belongs to, if any."""
        for step, loop in self.iter_steps():
            if step.name == name:
                return loop
        if self.shaped(name) is not None:
            return None
        raise KeyError(name)

    def input_model(self) -> type[BaseModel]:
        """A pydantic model of this agent's input, for validation at the door (built once:
        building it costs far more than a validation)."""
        if self._input_model is None:
            self._input_model = self._build_input_model()
        return self._input_model

    def _build_input_model(self) -> type[BaseModel]:
        types = {"string": str, "integer": int, "number": float, "boolean": bool}
        fields: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            kwargs: dict[str, Any] = {"description": spec.description}
            if spec.max_length is not None and spec.type == "string":
                kwargs["max_length"] = spec.max_length
            default = ... if spec.required else spec.default
            fields[name] = (types[spec.type], Field(default, **kwargs))
        return create_model(  # type: ignore[call-overload]
            f"{self.name}_input",
            __config__=ConfigDict(extra="forbid", strict=False),
            **fields,
        )

    def validate_input(self, data: Any) -> dict[str, Any]:
        """Validate a run input; raise :class:`InvalidSubmission` naming the field on error."""
        if not isinstance(data, dict):
            raise InvalidSubmission(f"input of agent '{self.name}' must be a JSON object", "input")
        try:
            return self.input_model()(**data).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            field = f"input.{loc}" if loc else "input"
            raise InvalidSubmission(
                f"agent '{self.name}': {field}: {err['msg']}", field
            ) from None

    def json_schema(self) -> dict[str, Any]:
        """JSON schema of the input."""
        return self.input_model().model_json_schema()


@dataclass(frozen=True)
class _Scope:
    inputs: frozenset[str]
    steps: frozenset[str]
    in_loop: bool
    in_branch: bool = False


def _check_template(agent: str, step: str, template: str, scope: _Scope) -> None:
    for ref in PLACEHOLDER.findall(template):
        head, _, rest = ref.partition(".")
        name = rest.split(".", 1)[0]
        if head == "input" and name in scope.inputs:
            continue
        if head == "steps" and name in scope.steps:
            continue
        if head == "loop" and scope.in_loop and rest in ("transcript", "iteration"):
            continue
        if head == "session" and rest in ("transcript", "id"):
            continue
        if head == "branch" and scope.in_branch and name in ("item", "index"):
            continue
        raise AgentDefinitionError(
            f"agent '{agent}', step '{step}': template refers to unknown '{{{ref}}}'"
        )


def _check(agent: AgentDef, tool_names: set[str]) -> None:
    """Cross-field checks that pydantic alone cannot express."""
    seen: dict[str, LlmStep | ToolStep] = {}
    inputs = frozenset(agent.inputs)
    for top in agent.steps:
        names = [s.name for s in top.body] if isinstance(top, LoopStep) else []
        for name in [top.name, *names]:
            if name in seen or names.count(name) > 1 or name == top.name and name in names:
                raise AgentDefinitionError(f"agent '{agent.name}', step '{name}': duplicate step name")
        if isinstance(top, LoopStep):
            loop_scope = _Scope(inputs, frozenset(seen) | frozenset(names), True)
            for inner in top.body:
                _check_step(agent, inner, loop_scope, seen | {s.name: s for s in top.body}, tool_names)
            until = next((s for s in top.body if s.name == top.until), None)
            if not isinstance(until, LlmStep) or until.parse != "tool_call":
                raise AgentDefinitionError(
                    f"agent '{agent.name}', step '{top.name}': 'until' must name an llm step "
                    "of the body with parse = 'tool_call'"
                )
            seen.update({s.name: s for s in top.body})
        elif isinstance(top, Shaped):
            _check_shaped(agent, top, _Scope(inputs, frozenset(seen), False, True), seen, tool_names)
            seen[top.name] = top  # type: ignore[assignment]
        else:
            _check_step(agent, top, _Scope(inputs, frozenset(seen), False), seen, tool_names)
            seen[top.name] = top
    head = agent.result.split(".", 1)[0]
    if head not in seen:
        raise AgentDefinitionError(f"agent '{agent.name}': result refers to unknown step '{head}'")
    for name in agent.inputs:
        if name not in agent.example and agent.inputs[name].required:
            raise AgentDefinitionError(f"agent '{agent.name}': example lacks input '{name}'")
    try:
        agent.validate_input(agent.example)
    except InvalidSubmission as exc:
        raise AgentDefinitionError(f"agent '{agent.name}': example is invalid: {exc}") from None


def _check_step(
    agent: AgentDef,
    step: LlmStep | ToolStep,
    scope: _Scope,
    known: dict[str, LlmStep | ToolStep],
    tool_names: set[str],
) -> None:
    where = f"agent '{agent.name}', step '{step.name}'"
    if isinstance(step, LlmStep):
        _check_template(agent.name, step.name, step.prompt, scope)
        _check_template(agent.name, step.name, agent.system, scope)
        for tool in step.tools:
            if tool not in tool_names:
                raise AgentDefinitionError(f"{where}: unknown tool '{tool}'")
        return
    if step.input is not None:
        _check_template(agent.name, step.name, step.input, scope)
    for tool in [step.tool, *step.allowed_tools]:
        if tool is not None and tool not in tool_names:
            raise AgentDefinitionError(f"{where}: unknown tool '{tool}'")
    if step.tool_from == "item" and scope.in_branch:
        pass  # a map branch's item is its tool call
    elif step.tool_from is not None:
        source = known.get(step.tool_from)
        if not isinstance(source, LlmStep) or source.parse != "tool_call":
            raise AgentDefinitionError(
                f"{where}: tool_from must name an earlier llm step with parse = 'tool_call'"
            )
        if not step.allowed_tools:
            raise AgentDefinitionError(f"{where}: tool_from needs a non-empty allowed_tools")


def _check_shaped(
    agent: AgentDef, top: ParallelStep | WaitStep, scope: _Scope, known: dict[str, LlmStep | ToolStep],
    tool_names: set[str],
) -> None:
    where = f"agent '{agent.name}', step '{top.name}'"
    if isinstance(top, WaitStep):
        if not known:
            raise AgentDefinitionError(f"{where}: a wait step cannot be an agent's first step")
        return
    if top.over is not None:
        if top.over.split(".", 1)[0] not in known:
            raise AgentDefinitionError(f"{where}: 'over' must name an earlier step's output")
        if not known:
            raise AgentDefinitionError(f"{where}: a map cannot be an agent's first step")
    names = [b.name for b in top.branches]
    if len(set(names)) != len(names):
        raise AgentDefinitionError(f"{where}: duplicate branch name")
    for body in top.branches or [top.branch]:  # type: ignore[list-item]
        if top.over is None and body.kind == "tool" and body.tool_from == "item":
            raise AgentDefinitionError(f"{where}: tool_from = 'item' needs 'over'")
        _check_step(agent, body, scope, known, tool_names)


def parse_agent(data: dict[str, Any], tool_names: set[str], source: str = "<data>") -> AgentDef:
    """Validate one agent definition; errors name the agent and the step."""
    name = data.get("name", source) if isinstance(data, dict) else source
    try:
        agent = AgentDef.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        where = f"agent '{name}'"
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            steps = data.get("steps", [])
            step_name = steps[loc[1]].get("name", f"#{loc[1]}") if loc[1] < len(steps) else loc[1]
            where += f", step '{step_name}'"
            loc = loc[2:]
            if loc and loc[0] in ("llm", "tool", "loop", "parallel", "wait"):  # the discriminator's tag
                loc = loc[1:]
        field = ".".join(str(p) for p in loc)
        raise AgentDefinitionError(f"{where}: {field + ': ' if field else ''}{err['msg']}") from None
    _check(agent, tool_names)
    return agent


def load_agent_file(path: Path, tool_names: set[str]) -> AgentDef:
    """Load and validate one ``*.toml`` agent definition."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise AgentDefinitionError(f"agent file {path.name}: {exc}") from None
    return parse_agent(data, tool_names, source=path.stem)


def load_agents(extra_dir: Path | None = None) -> dict[str, AgentDef]:
    """The built-in agents, plus those in ``extra_dir`` (which may override a built-in)."""
    from fleet.run.tools import TOOLS

    names = set(TOOLS)
    agents: dict[str, AgentDef] = {}
    builtin = resources.files("fleet.run") / "agents"
    paths: list[Path] = sorted(Path(str(p)) for p in builtin.iterdir() if p.name.endswith(".toml"))
    if extra_dir is not None:
        paths += sorted(Path(extra_dir).glob("*.toml"))
    for path in paths:
        agent = load_agent_file(path, names)
        agents[agent.name] = agent
    return agents
