"""Simulator of the medium model: deterministic text and a continuous-batching engine.

This module holds all the logic behind the ``medium_sim`` Triton model, a CPU stand-in
for the medium LLM served by Triton's vLLM backend. It imports nothing from Triton so
that it can be unit tested (and reused) without a server; the Triton python model in
``triton_models/medium_sim/1/model.py`` only translates tensors to and from it.

Three parts:

* Text: ``tokenize``/``count_tokens`` (a token is a word with its trailing whitespace)
  and ``generate``, which applies the simulator's "skills" (tool choice, answering from
  an observation, deterministic pseudo-text) to a prompt.
* Timing and faults: ``SimConfig`` (built from the model's config parameters),
  ``step_time_s`` and ``decide_fault``.
* ``Engine``: one per model instance; a background thread runs vLLM-like decode steps
  over up to ``max_num_seqs`` active sequences, each producing one token per step, with a KV
  cache that keeps computed prompt prefixes as vLLM's automatic prefix caching does
  (``prefix_cache.py``, beside this file): a prompt pays prefill only after its cached prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Protocol

# prefix_cache.py sits beside this file; whoever loads this module by path may not have put
# that folder on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from prefix_cache import Allocation, PrefixCache, block_hashes, blocks_for  # noqa: E402

logger = logging.getLogger(__name__)

#: vLLM's ``SamplingParams.max_tokens`` default.
DEFAULT_MAX_TOKENS = 16

#: Error codes handed to a ``TokenSink``; the Triton model maps them to TritonError codes.
UNAVAILABLE = "UNAVAILABLE"
INVALID_ARG = "INVALID_ARG"

#: Values of the simulator-only ``sim_fault`` sampling parameter.
SIM_FAULTS = ("unavailable", "invalid", "stall")

_TOKEN_RE = re.compile(r"\S+\s*")
# Runs of characters that may form an arithmetic expression; a run only counts when an
# operator sits between two numbers (checked by _OPERATOR_BETWEEN_NUMBERS_RE).
_EXPR_RUN_RE = re.compile(r"[0-9.+\-*/()^% ]+")
_OPERATOR_BETWEEN_NUMBERS_RE = re.compile(r"\d[\s()]*[+\-*/^%][\s()]*[\d.(]")

# Plain English words for the pseudo-text skill; order matters for determinism.
VOCABULARY: tuple[str, ...] = tuple(
    """
    the a an and or but so because while after before when where which that this these
    those it its they them their we our you your he she his her one two three four five
    many few some every each other more most less time day week year world people
    system model worker queue task step result answer question idea plan data signal
    value number list table record report note change update error warning message
    request response server client network service cluster node batch stream token
    text word sentence paragraph page book story river mountain forest ocean city road
    bridge garden window door house light shadow color sound voice music picture
    simple clear quick slow careful bright quiet steady large small early late new old
    good useful important common possible likely certain ready open closed full empty
    is are was were be been has have had does do did can could will would should may
    might must make makes made take takes took give gives gave find finds found keep
    keeps kept show shows shown run runs ran move moves moved build builds built read
    reads write writes wrote check checks checked start starts started finish finishes
    finished help helps helped learn learns learned follow follows followed send sends
    sent wait waits waited turn turns turned bring brings brought hold holds held
    again also always often never sometimes usually together almost already still
    """.split()
)

_SENTENCE_MIN_WORDS = 9
_SENTENCE_MAX_WORDS = 15


# --------------------------------------------------------------------------------------
# Tokens and sampling parameters
# --------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Split text into simulator tokens: words with their trailing whitespace.

    Args:
        text: Any text.

    Returns:
        The tokens; ``"".join(tokens)`` equals ``text`` minus leading whitespace.
    """
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """Count simulator tokens in text (see ``tokenize``).

    Args:
        text: Any text.

    Returns:
        The number of whitespace-separated words.
    """
    return len(tokenize(text))


_INT_KEYS = ("max_tokens", "min_tokens", "n", "best_of", "top_k", "seed")
_FLOAT_KEYS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "length_penalty",
)
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens", "use_beam_search")


def _as_int(key: str, value: Any) -> int:
    # The vLLM backend casts with int(), so integral strings ("32") are accepted too.
    if isinstance(value, bool):
        raise ValueError(f"sampling parameter '{key}' must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"sampling parameter '{key}' must be an integer, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"sampling parameter '{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sampling parameter '{key}' must be a number, got {value!r}") from None


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"sampling parameter '{key}' must be a boolean, got {value!r}")


def parse_sampling_parameters(raw: str | bytes | None) -> dict[str, Any]:
    """Parse and validate the ``sampling_parameters`` JSON of a request.

    Known vLLM keys are type-checked and normalised (integral strings are accepted for
    integer keys, as the vLLM backend casts them); unknown keys are kept as they are.
    Simulator-only keys: ``sim_fault`` (one of ``SIM_FAULTS``) and ``sim_stall_ms``.

    Args:
        raw: The JSON text (or UTF-8 bytes); ``None`` or blank means no parameters.

    Returns:
        The parameters as a dict.

    Raises:
        ValueError: On malformed JSON, a non-object document or a value of the wrong
            type or range.
    """
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"sampling_parameters is not valid UTF-8: {exc}") from None
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"sampling_parameters must be a JSON object, got {type(doc).__name__}"
        )
    params: dict[str, Any] = dict(doc)
    for key in _INT_KEYS:
        if key in params and params[key] is not None:
            params[key] = _as_int(key, params[key])
    for key in _FLOAT_KEYS:
        if key in params and params[key] is not None:
            params[key] = _as_float(key, params[key])
    for key in _BOOL_KEYS:
        if key in params and params[key] is not None:
            params[key] = _as_bool(key, params[key])
    if params.get("max_tokens") is not None and params["max_tokens"] < 1:
        raise ValueError(f"max_tokens must be at least 1, got {params['max_tokens']}")
    if "stop" in params and params["stop"] is not None:
        stop = params["stop"]
        if isinstance(stop, str):
            params["stop"] = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ValueError("sampling parameter 'stop' must be a string or a list of strings")
    if "sim_fault" in params and params["sim_fault"] is not None:
        if params["sim_fault"] not in SIM_FAULTS:
            raise ValueError(
                f"sim_fault must be one of {', '.join(SIM_FAULTS)}, got {params['sim_fault']!r}"
            )
    if "sim_stall_ms" in params and params["sim_stall_ms"] is not None:
        stall = _as_float("sim_stall_ms", params["sim_stall_ms"])
        if stall < 0:
            raise ValueError(f"sim_stall_ms must be non-negative, got {stall}")
        params["sim_stall_ms"] = stall
    return params


# --------------------------------------------------------------------------------------
# Text rules ("skills")
# --------------------------------------------------------------------------------------


def _last_line_index(lines: list[str], prefix: str) -> int:
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(prefix):
            return i
    return -1


def _after_prefix(line: str, prefix: str) -> str:
    return line.lstrip()[len(prefix) :].strip()


def find_arithmetic(text: str) -> str | None:
    """Find the first arithmetic expression in text.

    An expression is a run of digits, ``+ - * / ( ) . ^ %`` and spaces with at least one
    operator between two numbers.

    Args:
        text: Text to search, e.g. a question.

    Returns:
        The expression with surrounding spaces and dots stripped, or ``None``.
    """
    for match in _EXPR_RUN_RE.finditer(text):
        run = match.group(0)
        if _OPERATOR_BETWEEN_NUMBERS_RE.search(run):
            # A sentence's full stop after the last number is not part of the expression.
            return run.strip(" .")
    return None


def _tool_choice(lines: list[str]) -> str | None:
    tools_at = _last_line_index(lines, "Tools:")
    question_at = _last_line_index(lines, "Question:")
    if tools_at < 0 or question_at < 0:
        return None
    # Once an observation follows the question the tool has run: answer instead, so an
    # agent loop that keeps the tool list in its prompt terminates.
    if _last_line_index(lines, "Observation:") > question_at:
        return None
    tools = [t.strip() for t in _after_prefix(lines[tools_at], "Tools:").split(",")]
    tools = [t for t in tools if t]
    if not tools:
        return None
    question = _after_prefix(lines[question_at], "Question:")
    expressions = [m.group(0).strip(" .") for m in _EXPR_RUN_RE.finditer(question)
                   if _OPERATOR_BETWEEN_NUMBERS_RE.search(m.group(0))]
    if len(expressions) > 1 and "calculator" in tools:
        # Several sums in one question: one call each, asked for at once (a JSON list).
        return json.dumps([{"tool": "calculator", "input": e} for e in expressions])
    expression = find_arithmetic(question)
    if expression is not None and "calculator" in tools:
        choice = {"tool": "calculator", "input": expression}
    else:
        others = [t for t in tools if t != "calculator"]
        choice = {"tool": others[0] if others else tools[0], "input": question}
    return json.dumps(choice)


def _answer(lines: list[str]) -> str | None:
    observed_at = _last_line_index(lines, "Observation:")
    if observed_at < 0:
        return None
    return f"The answer is {_after_prefix(lines[observed_at], 'Observation:')}."


def _pseudo_text(prompt: str, seed: Any, n_words: int) -> str:
    digest = hashlib.sha256(f"{seed!r}\x00{prompt}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    words: list[str] = []
    sentence_left = 0
    for i in range(n_words):
        word = rng.choice(VOCABULARY)
        if sentence_left == 0:
            sentence_left = rng.randint(_SENTENCE_MIN_WORDS, _SENTENCE_MAX_WORDS)
            word = word.capitalize()
        sentence_left -= 1
        if sentence_left == 0 or i == n_words - 1:
            word += "."
        words.append(word)
    return " ".join(words)


def _apply_stop(tokens: list[str], stops: list[str]) -> list[str] | None:
    text = "".join(tokens)
    cuts = [text.find(s) for s in stops if s and s in text]
    if not cuts:
        return None
    # vLLM leaves the stop string out of the output by default.
    return tokenize(text[: min(cuts)])


def generate(prompt: str, params: Mapping[str, Any]) -> tuple[list[str], str]:
    """Produce the simulator's full output for a prompt.

    Rules, first match wins:

    1. Tool choice: a ``Tools:`` line and a ``Question:`` line (and no ``Observation:``
       line after the question) give one JSON line ``{"tool": ..., "input": ...}``:
       ``calculator`` with the expression when the question holds arithmetic and the
       tool is listed, else the first listed tool other than ``calculator`` with the
       question as input. A question holding several expressions gives a JSON list of
       ``calculator`` calls, one per expression (several tool calls in one reply).
    2. Answer: an ``Observation:`` line gives ``The answer is <observation>.``
    3. Pseudo-text: exactly ``max_tokens`` words from ``VOCABULARY``, picked by a hash
       of the prompt and the ``seed`` parameter, in capitalised sentences of 9-15 words.

    Rules 1 and 2 finish with ``"stop"`` when shorter than ``max_tokens`` and are cut
    to ``max_tokens`` with ``"length"`` otherwise; rule 3 always ends with ``"length"``.
    A ``stop`` string found in the output cuts it there with ``"stop"``.

    Args:
        prompt: The prompt text.
        params: Parsed sampling parameters (see ``parse_sampling_parameters``).

    Returns:
        The output tokens (joined they form the text) and the finish reason.

    Raises:
        ValueError: If ``max_tokens`` is below 1.
    """
    max_tokens = params.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    # The fleet's plain-text layout opens the person's message with a "User: " label.
    lines = [line[len("User:"):].lstrip() if line.startswith("User:") else line for line in prompt.splitlines()]
    skill_text = _tool_choice(lines)
    if skill_text is None:
        skill_text = _answer(lines)
    if skill_text is not None:
        tokens = tokenize(skill_text)
        if len(tokens) < max_tokens:
            tokens, reason = tokens, "stop"
        else:
            tokens, reason = tokens[:max_tokens], "length"
    else:
        tokens, reason = tokenize(_pseudo_text(prompt, params.get("seed"), max_tokens)), "length"
    stops = params.get("stop") or []
    if stops:
        cut = _apply_stop(tokens, list(stops))
        if cut is not None:
            tokens, reason = cut, "stop"
    return tokens, reason


# --------------------------------------------------------------------------------------
# Configuration, timing and faults
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """Timing and fault settings of the simulator, from the model's config parameters.

    Attributes:
        ttft_ms: Fixed latency (ms) of each request before it may join the batch
            (scheduling, tokenization, transfer); it delays that request only.
        prefill_ms_per_token: Prefill compute (ms) per input token of the sequences a
            step admits; it lengthens that step for every active sequence, as a prefill
            delays the decodes batched with it.
        tpot_ms: Decode step time (ms) with a single active sequence.
        load_factor: Fractional slow-down of a step per extra active sequence.
        max_num_seqs: Most sequences decoded together; the rest wait in the queue.
        error_rate: Fraction (0..1) of requests failing with UNAVAILABLE before the
            first token.
        stall_rate: Fraction (0..1) of requests held back ``stall_ms`` before admission.
        stall_ms: How long (ms) a stalled request waits before it may be admitted.
        seed: Seed of the fault decisions.
        num_gpu_blocks: KV cache size in blocks (vLLM's ``num_gpu_blocks_override``); a
            request waits while the blocks for its prompt and output do not fit; 0: unbounded.
        block_size: Tokens per KV block (vLLM's default 16).
        enable_prefix_caching: Whether computed prompt blocks are kept and reused.
        block_trace_dir: When set, each request's prompt block hashes are appended to a JSON
            lines file there (one per engine) when it is admitted, with the blocks found cached,
            how long it waited in the engine and whether it streams, so a benchmark can work out
            what a workload could reuse at most and where a call's time to first token went.
    """

    ttft_ms: float = 150.0
    prefill_ms_per_token: float = 0.2
    tpot_ms: float = 25.0
    load_factor: float = 0.02
    max_num_seqs: int = 64
    error_rate: float = 0.0
    stall_rate: float = 0.0
    stall_ms: float = 1000.0
    seed: int = 0
    num_gpu_blocks: int = 0
    block_size: int = 16
    enable_prefix_caching: bool = True
    block_trace_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "prefill_ms_per_token", "tpot_ms", "load_factor", "stall_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("error_rate", "stall_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.block_size < 1 or self.num_gpu_blocks < 0:
            raise ValueError(f"block_size must be at least 1 and num_gpu_blocks non-negative, "
                             f"got {self.block_size} and {self.num_gpu_blocks}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> SimConfig:
        """Build a config from Triton model config parameters.

        Args:
            parameters: Parameter name to string value; Triton's own form
                (``{"name": {"string_value": "..."}}``) is accepted too. Unknown names
                are ignored; missing ones keep their defaults.

        Returns:
            The config.

        Raises:
            ValueError: If a value does not parse or is out of range.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in parameters:
                continue
            raw = parameters[f.name]
            if isinstance(raw, Mapping):
                raw = raw.get("string_value", "")
            text = str(raw).strip()
            if not text:
                continue
            try:
                kwargs[f.name] = _parse_parameter(f.type, text)
            except ValueError:
                raise ValueError(f"config parameter {f.name}={text!r} is not a {f.type}") from None
        return cls(**kwargs)


def _parse_parameter(kind: Any, text: str) -> Any:
    if kind in (bool, "bool"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if kind in (str, "str"):
        return text
    return int(text) if kind in (int, "int") else float(text)


def step_time_s(cfg: SimConfig, n_active: int, n_new: int, new_input_tokens: int) -> float:
    """Duration of one engine step.

    ``tpot_ms * (1 + load_factor * (n_active - 1))`` for the decode, plus
    ``prefill_ms_per_token * new_input_tokens`` for the prompts admitted this step.
    (``ttft_ms`` is not part of a step: it delays each request before admission.)

    Args:
        cfg: Simulator config.
        n_active: Sequences producing a token this step (the admitted ones included).
        n_new: Sequences admitted this step.
        new_input_tokens: Total input tokens of the admitted sequences.

    Returns:
        The step duration in seconds.
    """
    ms = 0.0
    if n_active > 0:
        ms += cfg.tpot_ms * (1.0 + cfg.load_factor * (n_active - 1))
    if n_new > 0:
        ms += cfg.prefill_ms_per_token * new_input_tokens
    return ms / 1000.0


def _unit_floats(*parts: Any) -> tuple[float, float]:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    scale = float(1 << 64)
    return (
        int.from_bytes(digest[:8], "big") / scale,
        int.from_bytes(digest[8:16], "big") / scale,
    )


def decide_fault(cfg: SimConfig, prompt: str, counter: int) -> str | None:
    """Decide the injected fault of a request, reproducibly.

    Args:
        cfg: Simulator config (``error_rate``, ``stall_rate``, ``seed``).
        prompt: The request's prompt.
        counter: The request's arrival number within the engine.

    Returns:
        ``"unavailable"``, ``"stall"`` or ``None``.
    """
    if cfg.error_rate <= 0.0 and cfg.stall_rate <= 0.0:
        return None
    u_error, u_stall = _unit_floats(cfg.seed, counter, prompt)
    if u_error < cfg.error_rate:
        return "unavailable"
    if u_stall < cfg.stall_rate:
        return "stall"
    return None


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------


class TokenSink(Protocol):
    """Where the engine sends what one sequence produces (one Triton response sender)."""

    def is_cancelled(self) -> bool:
        """Whether the client cancelled the request."""
        ...

    def send_token(self, token: str, finish_reason: str | None) -> None:
        """Deliver one new token; ``finish_reason`` is set on the sequence's last one."""
        ...

    def send_error(self, code: str, message: str) -> None:
        """Fail the request (``UNAVAILABLE`` or ``INVALID_ARG``); nothing follows."""
        ...

    def send_cancelled(self) -> None:
        """Close a request the client cancelled; nothing follows."""
        ...


@dataclass
class Sequence:
    """One request inside the engine.

    Attributes:
        seq_id: Arrival number within the engine.
        prompt: Prompt text.
        input_tokens: Prompt length in simulator tokens.
        tokens: The full output, computed at submission.
        finish_reason: Finish reason once every token has been sent.
        sink: Where tokens go.
        fault: Injected fault (``"unavailable"``, ``"stall"``) or ``None``.
        ready_at: Monotonic time before which the sequence may not be admitted.
        sent: Tokens sent so far.
        stream: Whether its client takes one response per token.
        blocked_at_step: The engine step at which it was first ready but found every
            sequence slot taken (``None`` while it never waited for a slot).
        prompt_tokens: The prompt's tokens.
        hashes: Chained hashes of the prompt's full KV blocks.
        cached_tokens: Prompt tokens found in the prefix cache when it was admitted.
        alloc: Its KV blocks while it runs.
        arrived_at: Monotonic time it was submitted (its time to first token counts from it).
        last_token_at: Monotonic time its last token was sent.
    """

    seq_id: int
    prompt: str
    input_tokens: int
    tokens: list[str]
    finish_reason: str
    sink: TokenSink
    fault: str | None = None
    ready_at: float = 0.0
    sent: int = 0
    stream: bool = False
    blocked_at_step: int | None = None
    prompt_tokens: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    cached_tokens: int = 0
    alloc: Allocation | None = None
    arrived_at: float = 0.0
    last_token_at: float = 0.0


#: Latencies kept for the metrics thread at most (it drains them every few tens of ms).
LATENCIES_KEPT = 200_000
#: Bucket bounds (seconds) of the histograms the vLLM backend of the pinned Triton image exports
#: (triton-inference-server/vllm_backend r25.12, src/utils/metrics.py): ``vllm:time_to_first_token_seconds``
#: and ``vllm:time_per_output_token_seconds`` (observed per token: vLLM's inter-token latencies).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass
class EngineStats:
    """Counters of an engine since it started.

    ``waiting`` counts what vLLM's ``num_requests_waiting`` counts: sequences ready to run
    that found every slot (or the KV blocks they need) taken; ``arriving`` those still within their ``ttft_ms`` (on
    their way in, not yet schedulable). A sequence that waited for a slot is counted in
    ``slot_waits`` (``slot_waits_stream`` for streamed ones), and the most engine steps one
    waited in ``slot_wait_steps_max`` (``..._stream``).
    """

    submitted: int = 0
    admitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    tokens: int = 0
    active: int = 0
    waiting: int = 0
    arriving: int = 0
    max_active: int = 0
    slot_waits: int = 0
    slot_waits_stream: int = 0
    slot_wait_steps_max: int = 0
    slot_wait_steps_max_stream: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    kv_usage: float = 0.0
    kv_evicted_blocks: int = 0


class _BlockTrace:
    """Each admitted request's prompt block hashes, appended to a JSON lines file (when a folder is
    given): time of admission, prompt tokens, the first 8 bytes of each hash in hex, the blocks
    found cached, seconds from arrival to admission (the wait for a sequence slot or KV blocks, and
    any injected stall), and whether the request streams."""

    def __init__(self, folder: str, name: str) -> None:
        self._lock = threading.Lock()
        self._file = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self._file = open(os.path.join(folder, f"{name}-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115

    def write(self, n_tokens: int, hashes: list[bytes], hit_blocks: int, arrived_at: float, stream: bool) -> None:
        if self._file is None:
            return
        line = json.dumps({"t": time.time(), "n": n_tokens, "h": [h[:8].hex() for h in hashes], "hit": hit_blocks,
                           "w": round(time.monotonic() - arrived_at, 6), "s": stream})
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Engine:
    """vLLM-like continuous batching over simulated sequences.

    ``submit`` queues a sequence; a background thread repeatedly admits waiting
    sequences (up to ``max_num_seqs`` active), sleeps for ``step_time_s`` and then hands
    every active sequence its next token. Sequences leave when their output is done or
    their client cancelled. When there is nothing to do the thread blocks on a
    condition variable, so an idle engine costs no CPU even with all timings at zero.
    """

    def __init__(self, cfg: SimConfig, name: str = "medium_sim") -> None:
        """Start the engine thread.

        Args:
            cfg: Simulator config.
            name: Name for the thread and log lines.
        """
        self.cfg = cfg
        self.name = name
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._running = True
        self._stopping = threading.Event()
        self._counter = 0
        self._stats = EngineStats()
        self._ttft: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self._tpot: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self._cache = PrefixCache(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self._trace = _BlockTrace(cfg.block_trace_dir, name)
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()
        logger.info("engine %s started with %s", name, cfg)

    # --- public API -------------------------------------------------------------------

    def submit(self, prompt: str, params: Mapping[str, Any], sink: TokenSink, stream: bool = False) -> int:
        """Queue a request.

        Faults requested with ``sim_fault`` (or drawn from ``error_rate``/``stall_rate``)
        apply here: ``invalid`` fails at once with INVALID_ARG, ``unavailable`` fails
        with UNAVAILABLE when the sequence would be admitted, ``stall`` delays
        admission by ``sim_stall_ms`` (default ``stall_ms``).

        Args:
            prompt: Prompt text.
            params: Parsed sampling parameters.
            sink: Receives tokens, errors or the cancellation.
            stream: Whether the client takes a response per token (kept for statistics).

        Returns:
            The sequence id.

        Raises:
            ValueError: If the parameters cannot produce an output (e.g. max_tokens < 1).
            RuntimeError: If the engine was stopped.
        """
        tokens, finish_reason = generate(prompt, params)
        prompt_tokens = tokenize(prompt)
        cfg = self.cfg
        need = blocks_for(len(prompt_tokens) + len(tokens), cfg.block_size)
        if cfg.num_gpu_blocks and need > cfg.num_gpu_blocks:
            raise ValueError(f"the prompt and its output need {need} KV blocks; the cache holds {cfg.num_gpu_blocks}")
        hashes = block_hashes(prompt_tokens, cfg.block_size) if cfg.enable_prefix_caching else []
        with self._cv:
            if not self._running:
                raise RuntimeError(f"engine {self.name} is stopped")
            self._counter += 1
            seq_id = self._counter
            self._stats.submitted += 1
        fault = params.get("sim_fault") or decide_fault(self.cfg, prompt, seq_id)
        if fault == "invalid":
            with self._cv:
                self._stats.failed += 1
            sink.send_error(INVALID_ARG, "simulated invalid request (sim_fault=invalid)")
            return seq_id
        # A request joins the batch ttft_ms after it arrives (plus any injected stall).
        delay_ms = self.cfg.ttft_ms
        if fault == "stall":
            stall_ms = params.get("sim_stall_ms")
            delay_ms += self.cfg.stall_ms if stall_ms is None else float(stall_ms)
        ready_at = time.monotonic() + delay_ms / 1000.0 if delay_ms > 0 else 0.0
        seq = Sequence(
            seq_id=seq_id,
            prompt=prompt,
            input_tokens=len(prompt_tokens),
            tokens=tokens,
            finish_reason=finish_reason,
            sink=sink,
            fault=fault,
            ready_at=ready_at,
            stream=stream,
            prompt_tokens=prompt_tokens,
            hashes=hashes,
            arrived_at=time.monotonic(),
        )
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return seq_id

    @property
    def cancelled_count(self) -> int:
        """Sequences dropped because their client cancelled."""
        with self._cv:
            return self._stats.cancelled

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""
        with self._cv:
            snap = replace(self._stats)
            snap.active = len(self._active)
            now = time.monotonic()
            snap.waiting = sum(1 for s in self._waiting if s.ready_at <= now)
            snap.arriving = len(self._waiting) - snap.waiting
            cache = self._cache.stats
            snap.prefix_queries, snap.prefix_hits, snap.kv_evicted_blocks = cache.queries, cache.hits, cache.evicted_blocks
            snap.kv_usage = self._cache.used_fraction
            return snap

    def drain_latencies(self) -> tuple[list[float], list[float]]:
        """The times to first token and the times between two tokens of a sequence (vLLM's
        ``time_to_first_token`` and ``inter_token_latency``), in seconds, since the last drain."""
        with self._cv:
            ttft, tpot = list(self._ttft), list(self._tpot)
            self._ttft.clear()
            self._tpot.clear()
        return ttft, tpot

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the engine; queued and active requests fail with UNAVAILABLE.

        Args:
            timeout_s: How long to wait for the engine thread.
        """
        with self._cv:
            if not self._running:
                return
            self._running = False
            self._cv.notify_all()
        self._stopping.set()
        self._thread.join(timeout_s)
        with self._cv:
            left = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
            self._stats.failed += len(left)
        self._trace.close()
        for seq in left:
            self._safe(seq, seq.sink.send_error, UNAVAILABLE, "model is shutting down")
        logger.info("engine %s stopped (%d requests failed on shutdown)", self.name, len(left))

    # --- engine thread ----------------------------------------------------------------

    def _safe(self, seq: Sequence, fn: Any, *args: Any) -> bool:
        # A sink that raises (client gone, sender closed) must not kill the engine.
        try:
            fn(*args)
            return True
        except Exception:  # noqa: BLE001
            logger.exception("engine %s: sending to sequence %d failed", self.name, seq.seq_id)
            return False

    def _is_cancelled(self, seq: Sequence) -> bool:
        try:
            return bool(seq.sink.is_cancelled())
        except Exception:  # noqa: BLE001
            # A sender that cannot answer belongs to a request nobody waits for.
            logger.exception("engine %s: cancellation check failed", self.name)
            return True

    def _take_ready(self, now: float) -> list[Sequence]:
        # Called with the lock held: the ready sequences that fit, first come first served;
        # a ready one that does not fit (no sequence slot, or not its KV blocks) starts waiting
        # (counted once), and so do the ready ones behind it.
        room = self.cfg.max_num_seqs - len(self._active)
        taken: list[Sequence] = []
        kept: deque[Sequence] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.ready_at > now:
                kept.append(seq)
            elif len(taken) < room and self._allocate(seq):
                taken.append(seq)
                if seq.blocked_at_step is not None:
                    self._count_slot_wait(seq, self._stats.steps - seq.blocked_at_step)
            else:
                room = len(taken)  # first come, first served: nobody passes a waiting sequence
                if seq.blocked_at_step is None:
                    seq.blocked_at_step = self._stats.steps
                kept.append(seq)
        self._waiting = kept
        return taken

    def _allocate(self, seq: Sequence) -> bool:
        # Called with the lock held: the sequence's KV blocks, after its cached prefix.
        alloc = self._cache.allocate(seq.hashes, seq.input_tokens, seq.input_tokens + len(seq.tokens))
        if alloc is None:
            return False
        seq.alloc, seq.cached_tokens = alloc, len(alloc.cached) * self.cfg.block_size
        self._trace.write(seq.input_tokens, seq.hashes, len(alloc.cached), seq.arrived_at, seq.stream)
        return True

    def _free(self, seq: Sequence, completed: bool = False) -> None:
        # Called with the lock held: a sequence leaves; what its output filled is cached too.
        if seq.alloc is None:
            return
        tail: list[bytes] = []
        if completed and self.cfg.enable_prefix_caching:
            bs = self.cfg.block_size
            full = len(seq.hashes)
            rest = seq.prompt_tokens[full * bs:] + seq.tokens[:seq.sent]
            tail = block_hashes(rest, bs, seq.hashes[-1]) if full else block_hashes(rest, bs)
        self._cache.release(seq.alloc, tail)
        seq.alloc = None

    def _count_slot_wait(self, seq: Sequence, steps: int) -> None:
        if steps < 1:
            return  # admitted in the same step (a cancelled sequence ahead of it gave up its slot)
        st = self._stats
        if seq.stream:
            st.slot_waits_stream += 1
            st.slot_wait_steps_max_stream = max(st.slot_wait_steps_max_stream, steps)
        else:
            st.slot_waits += 1
            st.slot_wait_steps_max = max(st.slot_wait_steps_max, steps)

    def _wait_for_work(self) -> list[Sequence] | None:
        # Called with the lock held. Returns the sequences to admit, or None to exit.
        while self._running:
            now = time.monotonic()
            taken = self._take_ready(now)
            if taken or self._active:
                return taken
            next_ready = min((s.ready_at for s in self._waiting), default=None)
            self._cv.wait(None if next_ready is None else max(0.0, next_ready - now))
        return None

    def _admit(self, taken: list[Sequence]) -> list[Sequence]:
        admitted: list[Sequence] = []
        for seq in taken:
            if self._is_cancelled(seq):
                with self._cv:
                    self._stats.cancelled += 1
                    self._free(seq)
                self._safe(seq, seq.sink.send_cancelled)
            elif seq.fault == "unavailable":
                with self._cv:
                    self._stats.failed += 1
                    self._free(seq)
                self._safe(seq, seq.sink.send_error, UNAVAILABLE, "simulated transient failure")
            else:
                admitted.append(seq)
        return admitted

    def _loop(self) -> None:
        while True:
            with self._cv:
                taken = self._wait_for_work()
                if taken is None:
                    return
            admitted: list[Sequence] = []
            while taken:
                ok = self._admit(taken)
                admitted += ok
                with self._cv:
                    self._active.extend(ok)
                    # A cancelled or failed sequence leaves its slot to the next ready one now,
                    # as vLLM drops an aborted request from its queue at once.
                    taken = self._take_ready(time.monotonic()) if len(ok) < len(taken) else []
            with self._cv:
                active = list(self._active)
                self._stats.admitted += len(admitted)
                self._stats.max_active = max(self._stats.max_active, len(active))
            if not active:
                continue
            started = time.monotonic()
            # Prefill is paid for the prompt after its cached prefix only.
            duration = step_time_s(
                self.cfg, len(active), len(admitted), sum(s.input_tokens - s.cached_tokens for s in admitted)
            )
            if duration > 0 and self._stopping.wait(duration):
                return
            self._decode(active)
            logger.debug(
                "engine %s step: %d active, %d new, %.1f ms",
                self.name,
                len(active),
                len(admitted),
                (time.monotonic() - started) * 1000.0,
            )

    def _decode(self, active: list[Sequence]) -> None:
        done: list[Sequence] = []
        cancelled = 0
        completed = 0
        produced = 0
        now = time.monotonic()
        ttft: list[float] = []
        tpot: list[float] = []
        for seq in active:
            if self._is_cancelled(seq):
                cancelled += 1
                done.append(seq)
                self._safe(seq, seq.sink.send_cancelled)
                continue
            if not seq.tokens:
                # An output cut to nothing by a stop string still ends with one response.
                self._safe(seq, seq.sink.send_token, "", seq.finish_reason)
                completed += 1
                done.append(seq)
                continue
            token = seq.tokens[seq.sent]
            if seq.sent:
                tpot.append(now - seq.last_token_at)
            else:
                ttft.append(now - seq.arrived_at)
            seq.last_token_at = now
            seq.sent += 1
            last = seq.sent >= len(seq.tokens)
            produced += 1
            ok = self._safe(seq, seq.sink.send_token, token, seq.finish_reason if last else None)
            if last or not ok:
                completed += int(last and ok)
                done.append(seq)
        with self._cv:
            if done:
                gone = {id(s) for s in done}
                self._active = [s for s in self._active if id(s) not in gone]
                for seq in done:
                    self._free(seq, completed=seq.sent >= len(seq.tokens))
            self._stats.cancelled += cancelled
            self._stats.completed += completed
            self._stats.tokens += produced
            self._stats.steps += 1
            self._ttft.extend(ttft)
            self._tpot.extend(tpot)
