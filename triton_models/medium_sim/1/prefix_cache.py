"""The dev model's KV cache, with automatic prefix caching as vLLM's V1 engine does it.

What vLLM does (``vllm/v1/core/kv_cache_utils.py``, ``kv_cache_manager.py``, ``block_pool.py``),
and this module copies:

- A sequence's tokens live in fixed-size blocks (``block_size``, vLLM's default 16). Each *full*
  block gets a hash that chains its parent's (``hash(parent, block tokens)``), so a hash names a
  whole prefix, not just sixteen tokens.
- A new request's cached prefix is the longest run of its leading block hashes already resident,
  capped at ``(prompt_len - 1) // block_size`` blocks: the last prompt token is always computed
  (its logits are needed), so even a repeated prompt recomputes its last block.
- Prefill is paid only for the tokens after the cached prefix.
- Blocks no running sequence holds stay resident (and hittable) until their memory is needed:
  new blocks come from the free queue's head, evicting the least recently freed first, and a
  finished sequence frees its blocks tail first, so its prefix outlives its tail.
- ``vllm:prefix_cache_queries`` counts every prompt token looked up, ``vllm:prefix_cache_hits``
  the tokens found (both in tokens, so even a repeated prompt shows a rate below 1);
  ``vllm:kv_cache_usage_perc`` is the share of blocks held by running sequences.

Unlike vLLM, a sequence takes the blocks for its whole output when it is admitted (vLLM grows a
sequence block by block and preempts when memory runs out): the dev engine knows each output in
advance, and this keeps it free of preemptions. A request that does not fit waits, first come
first served, as vLLM's waiting queue does when blocks run short.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

#: vLLM's default block size (tokens per KV block).
DEFAULT_BLOCK_SIZE = 16
_ROOT = b"fleet-dev-root"


def block_hashes(tokens: Sequence[str], block_size: int = DEFAULT_BLOCK_SIZE, parent: bytes = _ROOT) -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens`` (a trailing partial block has none)."""
    out: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update("\x00".join(tokens[start:start + block_size]).encode("utf-8"))
        parent = h.digest()
        out.append(parent)
    return out


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


@dataclass
class Allocation:
    """The blocks one sequence holds: shared cached ones, then its own."""

    cached: list[bytes]  # hashes of the hit blocks it shares
    own: int  # blocks taken for the rest of its prompt and its output
    registered: list[bytes] = field(default_factory=list)  # hashes its own blocks made resident


@dataclass
class CacheStats:
    """Counters since the engine started, in vLLM's units (tokens)."""

    queries: int = 0
    hits: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """The KV blocks of one engine: ``num_blocks`` of them (0: as many as asked for)."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, enabled: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if num_blocks < 0:
            raise ValueError(f"num_gpu_blocks must be non-negative, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enabled = enabled
        self.stats = CacheStats()
        self._refs: dict[bytes, int] = {}  # resident hashed blocks -> sequences holding them
        self._free: OrderedDict[bytes, None] = OrderedDict()  # resident, held by none; head evicts first
        self._held = 0  # blocks held by running sequences (hashed or not)

    # --- what a request would get ---------------------------------------------------------
    def hit_blocks(self, hashes: Sequence[bytes], n_tokens: int) -> int:
        """Leading blocks of a prompt already resident (at most ``(n_tokens - 1) // block_size``)."""
        if not self.enabled:
            return 0
        most = min(len(hashes), max(0, n_tokens - 1) // self.block_size)
        n = 0
        while n < most and hashes[n] in self._refs:
            n += 1
        return n

    def allocate(self, hashes: Sequence[bytes], n_prompt: int, n_total: int) -> Allocation | None:
        """Blocks for a sequence of ``n_total`` tokens whose prompt is ``n_prompt`` tokens with these
        full-block hashes; None when they do not fit now. Counts the lookup (queries, hits)."""
        hit = self.hit_blocks(hashes, n_prompt)
        own = blocks_for(n_total, self.block_size) - hit
        reuse_free = sum(1 for h in hashes[:hit] if self._refs[h] == 0)
        if self.num_blocks and own > self._spare() - reuse_free:
            return None
        cached = list(hashes[:hit])
        for h in cached:
            if self._refs[h] == 0:
                del self._free[h]
                self._held += 1
            self._refs[h] += 1
        self._take(own)
        alloc = Allocation(cached=cached, own=own)
        # The prompt's full blocks become resident once computed (this step's prefill).
        self._register(alloc, hashes[hit:])
        self.stats.queries += n_prompt
        self.stats.hits += hit * self.block_size
        return alloc

    def release(self, alloc: Allocation, tail: Sequence[bytes] = ()) -> None:
        """A sequence is done: its blocks are freed, its tail first, and stay hittable until evicted.
        ``tail`` are the hashes of the full blocks its output completed (cached as vLLM does)."""
        self._register(alloc, tail)
        hashed = alloc.cached + alloc.registered
        self._held -= alloc.own - len(alloc.registered)  # unhashed blocks go straight back
        for h in reversed(hashed):  # tail first: the prefix is evicted last
            self._refs[h] -= 1
            if self._refs[h] == 0:
                self._held -= 1
                self._free[h] = None
        alloc.cached, alloc.registered, alloc.own = [], [], 0

    @property
    def used_fraction(self) -> float:
        """``vllm:kv_cache_usage_perc``: blocks held by running sequences over all blocks."""
        total = self.num_blocks or max(1, self._held + len(self._free))
        return self._held / total

    @property
    def resident(self) -> int:
        """Hashed blocks resident (held or free)."""
        return len(self._refs)

    # --- inside ----------------------------------------------------------------------------
    def _spare(self) -> int:
        # Blocks a new sequence may take: never used, or resident but held by none (evictable).
        return self.num_blocks - self._held

    def _take(self, n: int) -> None:
        if self.num_blocks:
            never_used = self.num_blocks - self._held - len(self._free)
            for _ in range(max(0, n - never_used)):
                victim, _ = self._free.popitem(last=False)
                del self._refs[victim]
                self.stats.evicted_blocks += 1
        self._held += n

    def _register(self, alloc: Allocation, hashes: Sequence[bytes]) -> None:
        # Own blocks that are full get their hash; one already resident (a twin computed at the
        # same time) is left as is and this block stays unhashed, as vLLM keeps the first.
        if not self.enabled:
            return
        room = alloc.own - len(alloc.registered)
        for h in hashes[:room]:
            if h in self._refs:
                continue
            self._refs[h] = 1
            alloc.registered.append(h)
