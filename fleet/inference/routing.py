"""What the router knows of a model call: the hashes of its prompt's blocks, and its affinity.

The engine keeps computed prompt prefixes in its KV cache, one replica at a time (vLLM's
automatic prefix caching: fixed blocks of ``block_size`` tokens, each block's hash chaining its
parent's). The router cannot see inside an engine, so it keeps its own, approximate, index of
what it sent where (:data:`fleet.keys.Keys.prefix_index`, trimmed to the engine's cache size, the
oldest first, as the engine evicts the least recently used): a call is expected to hit the
longest run of its leading blocks that the index holds for a replica.

Blocks are cut as the engine cuts them where the fleet has the prompt's token ids (the medium
model's chat format renders to ids): ``block_tokens`` ids each. Where it has text only (the dev
model's layout), a block is ``block_chars`` characters, about as many tokens (llm-d's
approximate prefix scorer does the same). Only full blocks count, and the chain starts from the
model's name, so two models never share an entry.

How a replica is chosen from these is the slot script's (``acquire.lua``), so that every
worker's choice and the index it reads change in one atomic step.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

#: vLLM's default KV block size, in tokens.
BLOCK_TOKENS = 16
#: A block of a prompt known as text only: 16 tokens at about 4 characters each.
BLOCK_CHARS = 64
#: Most leading blocks of a prompt the router looks at (llm-d's default: 256): 8,192 tokens.
MOST_BLOCKS = 512

#: Why a call went where it went (the slot script's answer; metrics and traces carry it).
REASONS = ("hit", "spill", "miss", "session", "most_room", "round_robin", "preempt")


@dataclass(frozen=True)
class RouteRequest:
    """What the router is told about one call."""

    affinity: str = ""  # the session's or run's id: 'session' routing keeps it on one replica
    blocks: list[str] = field(default_factory=list)  # hashes of the prompt's leading full blocks


def prefix_blocks(model: str, text: str, token_ids: Sequence[int] | None = None, *,
                  block_tokens: int = BLOCK_TOKENS, block_chars: int = BLOCK_CHARS,
                  most: int = MOST_BLOCKS) -> list[str]:
    """The chained hashes (16 hex digits each) of a prompt's leading full blocks."""
    if token_ids:
        ids = array("i", token_ids[: most * block_tokens])
        raw, size = ids.tobytes(), block_tokens * ids.itemsize
    else:
        raw, size = text[: most * block_chars].encode("utf-8", "surrogatepass"), block_chars
    parent = hashlib.blake2b(model.encode(), digest_size=8).digest()
    out: list[str] = []
    for start in range(0, len(raw) - size + 1, size):
        parent = hashlib.blake2b(parent + raw[start:start + size], digest_size=8).digest()
        out.append(parent.hex())
    return out
