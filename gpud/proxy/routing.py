"""Routing policies that keep a replica's KV cache warm (SPEC §13), pure: no I/O, one call per request.

`least-conn` (the default, gpud.proxy.balancer) spreads the turns of a conversation over the replicas and
throws their cached prefixes away. The two policies here send a request where its prefix most likely is:

* `session`: the key is the `X-Session-ID` header, else the body's `"user"`. A key's first request goes by
  least connections; later ones go to the replica it went to, while that replica is ready and not overloaded.
* `prefix`: the request's prompt (completions: `prompt`; chat: each message's role and text in order) cut
  into 256-character blocks; the request goes to the replica that most recently served the longest run of
  its leading blocks. Blocks are keyed by a hash of the whole prefix up to them, so a block only matches with
  the same history; only the first PREFIX_BLOCKS blocks are hashed (64 KiB of prompt), and a huge prompt is
  never copied whole.

Both bound the load (the failure mode of affinity without one: hot sessions piled on one replica): a replica
is overloaded when its in-flight count is above ceil(1.25 × the mean over the ready replicas) + 1, counted
before the request being routed. Then, and when the replica is not ready, the request goes by least
connections and the key follows it (outcome `overflow`). Both tables are bounded LRU maps (the failure mode of
an unbounded prefix trie: the router's memory growing with traffic). With several proxy workers each worker
keeps its own tables (docs/benchmarks.md measures what that costs in hit rate).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from gpud.proxy.balancer import choose
from gpud.proxy.table import ReplicaRoute

BLOCK_CHARS = 256
PREFIX_BLOCKS = 256  # blocks hashed at most: 64 KiB of prompt
MAX_SESSIONS = 100_000  # session keys remembered at most (per worker), least recently used dropped
SESSION_HEADER = b"x-session-id"


class Outcome(str, enum.Enum):
    """What `gpud_route_total{outcome}` counts."""

    HIT = "hit"  # the request went where its key or prefix pointed
    MISS = "miss"  # nothing known of it: least connections
    OVERFLOW = "overflow"  # known, but that replica was overloaded or not ready: least connections


def load_limit(loads: Sequence[int]) -> int:
    """The in-flight count above which a replica is overloaded: ceil(1.25 × mean) + 1 of the ready ones."""
    if not loads:
        return 0
    return math.ceil(1.25 * sum(loads) / len(loads)) + 1


class _Lru:
    """A bounded map, least recently used first out."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._map: OrderedDict[Hashable, int] = OrderedDict()

    def get(self, key: Hashable) -> int | None:
        return self._map.get(key)

    def put(self, key: Hashable, value: int) -> None:
        found = self._map
        found[key] = value
        found.move_to_end(key)
        if len(found) > self.limit:
            found.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


Choice = tuple[ReplicaRoute | None, int, Outcome]


def _usable(replica: ReplicaRoute, by_index: Mapping[int, ReplicaRoute], limit: int,
            inflight: Callable[[int], int], exclude: Sequence[int]) -> bool:
    return replica.index in by_index and replica.index not in exclude and inflight(replica.slot) <= limit


class SessionTable:
    """Session key → the replica index it last went to."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._keys = _Lru(limit)

    def choose(self, key: Hashable | None, ready: Sequence[ReplicaRoute], inflight: Callable[[int], int],
               cursor: int, exclude: Sequence[int] = ()) -> Choice:
        if key is None:
            replica, cursor = choose(ready, inflight, cursor, exclude)
            return replica, cursor, Outcome.MISS
        bound = self._keys.get(key)
        if bound is not None:
            by_index = {r.index: r for r in ready}
            replica = by_index.get(bound)
            limit = load_limit([inflight(r.slot) for r in ready])
            if replica is not None and _usable(replica, by_index, limit, inflight, exclude):
                return replica, cursor, Outcome.HIT
        replica, cursor = choose(ready, inflight, cursor, exclude)
        return replica, cursor, Outcome.MISS if bound is None else Outcome.OVERFLOW

    def served(self, key: Hashable | None, index: int) -> None:
        """The request with `key` was answered by replica `index`: the key follows it."""
        if key is not None:
            self._keys.put(key, index)

    def __len__(self) -> int:
        return len(self._keys)


class PrefixTable:
    """Prefix hash (of the prompt up to and including a block) → the replica that last served it."""

    def __init__(self, limit: int) -> None:
        self._blocks = _Lru(limit)

    def choose(self, hashes: Sequence[int], ready: Sequence[ReplicaRoute], inflight: Callable[[int], int],
               cursor: int, exclude: Sequence[int] = ()) -> Choice:
        by_index = {r.index: r for r in ready}
        limit = load_limit([inflight(r.slot) for r in ready])
        matched = False
        for h in reversed(hashes):  # the longest run of leading blocks first
            index = self._blocks.get(h)
            if index is None:
                continue
            matched = True
            replica = by_index.get(index)
            if replica is not None and _usable(replica, by_index, limit, inflight, exclude):
                return replica, cursor, Outcome.HIT
        replica, cursor = choose(ready, inflight, cursor, exclude)
        return replica, cursor, Outcome.OVERFLOW if matched else Outcome.MISS

    def served(self, hashes: Sequence[int], index: int) -> None:
        """Replica `index` answered a request with these prefixes: it now holds them, most recently."""
        for h in hashes:
            self._blocks.put(h, index)

    def __len__(self) -> int:
        return len(self._blocks)


# ---- what a request's body says -----------------------------------------------------------------------


def session_key(header: bytes | None, doc: Any) -> str | None:
    """X-Session-ID, else the body's "user"; None when neither is there."""
    if header:
        return header.decode("utf-8", "replace")
    user = doc.get("user") if isinstance(doc, dict) else None
    return user if isinstance(user, str) and user else None


def prompt_text(doc: Any, limit: int = BLOCK_CHARS * PREFIX_BLOCKS) -> str | None:
    """The part of a request's prompt that prefixes are made of (at most `limit` characters), or None.

    Completions: `prompt` (a string; of a list, the first prompt). Chat: each message's role and text content
    in order (text parts of a content list), separated so that no two different histories read alike.
    """
    if not isinstance(doc, dict):
        return None
    prompt = doc.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # several prompts: the first one
        if isinstance(prompt, str):
            return prompt[:limit]
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt[: limit // 4]):
            return ",".join(map(str, prompt[: limit // 4]))[:limit]  # token ids
        return None
    messages = doc.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        piece = f"{message.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e"
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit] if parts else None


def block_hashes(model: str, text: str, block: int = BLOCK_CHARS, limit: int = PREFIX_BLOCKS) -> list[int]:
    """For each whole block of `text` (up to `limit`), a hash of the prefix up to and including it, seeded
    with the model's name so that two models' prefixes never meet in one table."""
    out: list[int] = []
    h = hash(model)
    for start in range(0, min(len(text), block * limit) - block + 1, block):
        h = hash((h, text[start : start + block]))
        out.append(h)
    return out
