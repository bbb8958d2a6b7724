"""The sim engine's prefix cache and prefill arithmetic (SPEC §13), pure: no I/O, no clock.

vLLM keeps the KV cache of the prompt blocks it has computed and reuses it for a later prompt that starts
with the same blocks (automatic prefix caching), so a multi-turn chat is much faster on the replica that
served its earlier turns. This module models that, so that routing for it can be measured without a GPU:

- A prompt is text; tokens are counted as characters / 4, rounded up (at least 1 for a whole prompt).
- The text is cut into blocks of 256 characters (64 tokens), the last one possibly shorter. A block's key
  is a hash of the whole prefix up to and including it, so a block only matches after the same history.
- A replica's cache holds at most N tokens of blocks, least recently used dropped first. Within one
  prompt the later blocks count as older than the earlier ones (as vLLM frees a request's blocks tail
  first): a block is always dropped before the blocks in front of it, so what is cached of a prompt is
  always a run of its leading blocks, and the cache's memory is bounded by N whatever the traffic.
- The cached part of a prompt is its longest run of leading blocks present in the cache; a prompt that
  was seen whole (and fits in N) is a full hit. Its first token comes after
  `ttft_ms + X × uncached_tokens / 1000` ms, X being `--prefill-ms-per-1k-tokens`: a miss costs exactly
  the formula, a hit saves exactly its cached tokens.

The shell (gpud.sim.server) calls `Prefill.run` once per request when a sequence slot is granted, which
is when vLLM's scheduler looks the prompt up and allocates its blocks.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

BLOCK_CHARS = 256
CHARS_PER_TOKEN = 4
_KEY_BYTES = 16  # 128-bit keys: collisions are out of reach for any run of a simulator


def tokens_of(chars: int) -> int:
    """Tokens in `chars` characters of text: characters / 4, rounded up (0 for none)."""
    return -(-chars // CHARS_PER_TOKEN)


def prompt_tokens(text: str) -> int:
    """Tokens of a whole prompt: at least 1, as an empty prompt still costs the engine a forward pass."""
    return max(1, tokens_of(len(text)))


def prefill_seconds(uncached_tokens: int, ms_per_1k_tokens: float) -> float:
    """The prefill time of `uncached_tokens` at `ms_per_1k_tokens`, in seconds."""
    return ms_per_1k_tokens * uncached_tokens / 1000.0 / 1000.0


def _blocks(text: str, limit_tokens: int) -> Iterator[tuple[bytes, int]]:
    """(key, tokens) of each block of `text`, in order, stopping once `limit_tokens` are covered.

    The key hashes everything up to the block's end: a running hash, one digest per block. Blocks past
    the limit could neither hit nor stay in a cache of that size, so they are not hashed at all.
    """
    running = hashlib.blake2b(digest_size=_KEY_BYTES)
    covered = 0
    for start in range(0, len(text), BLOCK_CHARS):
        if covered >= limit_tokens:
            return
        block = text[start : start + BLOCK_CHARS]
        running.update(block.encode("utf-8", "surrogatepass"))  # JSON may carry lone surrogates
        tokens = tokens_of(len(block))
        covered += tokens
        yield running.digest(), tokens


@dataclass(frozen=True)
class Lookup:
    """What the cache found for one prompt."""

    prompt_tokens: int
    cached_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class PrefixCache:
    """An LRU cache of prompt blocks bounded by `capacity_tokens` (at least 1)."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"a prefix cache needs a capacity of at least 1 token, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self.tokens = 0  # tokens held, always <= capacity_tokens
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # oldest first

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._blocks)

    def match(self, text: str) -> int:
        """The cached tokens of `text` (its longest run of leading blocks held), changing nothing."""
        cached = 0
        for key, tokens in _blocks(text, self.capacity_tokens):
            if key not in self._blocks:
                break
            cached += tokens
        return cached

    def admit(self, text: str) -> Lookup:
        """Look `text` up, then hold its blocks as the most recently used (the engine computed them)."""
        cached = 0
        missed = False
        blocks = list(_blocks(text, self.capacity_tokens))
        for key, tokens in blocks:
            if key not in self._blocks:
                missed = True
            if not missed:
                cached += tokens
        # Touch the tail first, so that each block ends up more recent than every block after it.
        for key, tokens in reversed(blocks):
            if key in self._blocks:
                self._blocks.move_to_end(key)
            elif tokens <= self.capacity_tokens:
                self._blocks[key] = tokens
                self.tokens += tokens
        while self.tokens > self.capacity_tokens:
            _, dropped = self._blocks.popitem(last=False)
            self.tokens -= dropped
        return Lookup(prompt_tokens(text), cached)


class Prefill:
    """One replica's prefill: its cost per token, its cache (none when N is 0) and vLLM's two counters."""

    def __init__(self, ms_per_1k_tokens: float, cache_tokens: int) -> None:
        self.ms_per_1k_tokens = ms_per_1k_tokens
        self.cache = PrefixCache(cache_tokens) if cache_tokens > 0 else None
        self.queries = 0  # vllm:prefix_cache_queries_total: prompt tokens looked up in the cache
        self.hits = 0  # vllm:prefix_cache_hits_total: of those, the tokens found cached

    def run(self, prompts: Sequence[str]) -> float:
        """Admit a request's prompts in order; the prefill time before its first token, in seconds.

        The prompts of one request are prefilled one after the other, so a later prompt may hit blocks
        an earlier one just put in the cache. Without a cache every token is uncached and nothing is
        counted, as vLLM counts no prefix-cache queries when prefix caching is off.
        """
        uncached = 0
        for text in prompts:
            if self.cache is None:
                uncached += prompt_tokens(text)
                continue
            found = self.cache.admit(text)
            self.queries += found.prompt_tokens
            self.hits += found.cached_tokens
            uncached += found.uncached_tokens
        return prefill_seconds(uncached, self.ms_per_1k_tokens)
