"""The sim engine's prefix cache and prefill arithmetic (gpud.sim.prefix), pure: no server."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gpud.sim import api as simapi
from gpud.sim.prefix import (
    BLOCK_CHARS,
    Prefill,
    PrefixCache,
    prefill_seconds,
    prompt_tokens,
    tokens_of,
)

BLOCK_TOKENS = BLOCK_CHARS // 4  # 64


def block(letter: str) -> str:
    return letter * BLOCK_CHARS


# Texts built from a few runs of one letter of odd lengths: shared prefixes are common,
# and piece edges fall anywhere relative to block edges.
PIECES = st.lists(
    st.builds(str.__mul__, st.sampled_from("abc"), st.integers(min_value=1, max_value=700)),
    min_size=1,
    max_size=4,
    unique=True,
)


def texts_from(pieces: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), min_size=1, max_size=5).map("".join)


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[str]]:
    pieces = draw(PIECES)
    capacity = draw(st.integers(min_value=1, max_value=20 * BLOCK_TOKENS))
    return capacity, draw(st.lists(texts_from(pieces), min_size=1, max_size=30))


class Reference:
    """The cache as SPEC §13 words it, written naively: keys are the prefixes themselves, recency a clock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used: dict[str, int] = {}  # prefix text -> last use
        self.clock = 0

    def _prefixes(self, text: str) -> list[str]:
        ends = list(range(BLOCK_CHARS, len(text), BLOCK_CHARS)) + [len(text)] if text else []
        return [text[:end] for end in ends]

    @staticmethod
    def _tokens(prefix: str) -> int:
        return math.ceil((len(prefix) - (len(prefix) - 1) // BLOCK_CHARS * BLOCK_CHARS) / 4)

    def admit(self, text: str) -> int:
        prefixes = self._prefixes(text)
        cached = 0
        for prefix in prefixes:
            if prefix not in self.used:
                break
            cached = math.ceil(len(prefix) / 4)
        # A block too big for the cache alone can never be held, nor can anything behind it.
        fits = [self._tokens(p) <= self.capacity for p in prefixes]
        usable = prefixes[: fits.index(False)] if False in fits else prefixes
        # More recent for earlier blocks: the first block of the text is the newest of all.
        for prefix in reversed(usable):
            self.clock += 1
            self.used[prefix] = self.clock
        while sum(self._tokens(p) for p in self.used) > self.capacity:
            del self.used[min(self.used, key=self.used.__getitem__)]
        return cached


# --- arithmetic ------------------------------------------------------------------------------------


def test_tokens_are_characters_over_four_rounded_up() -> None:
    assert [tokens_of(n) for n in (0, 1, 4, 5, 8, 256)] == [0, 1, 1, 2, 2, 64]
    assert prompt_tokens("") == 1  # an empty prompt still costs a forward pass
    assert prompt_tokens("abcde") == 2
    assert prefill_seconds(1000, 200.0) == pytest.approx(0.2)
    assert prefill_seconds(0, 200.0) == 0.0


def test_a_capacity_under_one_token_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixCache(0)


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(histories())
def test_the_cache_matches_the_reference_and_never_holds_more_than_n_tokens(
    history: tuple[int, list[str]],
) -> None:
    capacity, texts = history
    cache, reference = PrefixCache(capacity), Reference(capacity)
    for text in texts:
        before = cache.match(text)
        found = cache.admit(text)
        assert found.cached_tokens == before  # match looks, admit looks the same way and stores
        assert found.cached_tokens == reference.admit(text)
        assert found.prompt_tokens == prompt_tokens(text)
        assert 0 <= found.uncached_tokens <= found.prompt_tokens
        assert cache.tokens <= capacity
        assert len(cache) <= capacity  # every block holds at least one token
        assert cache.tokens == sum(Reference._tokens(p) for p in reference.used)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=3000), st.integers(min_value=1, max_value=2000))
def test_a_repeated_prompt_is_a_full_hit_when_it_fits(text: str, capacity: int) -> None:
    cache = PrefixCache(capacity)
    assert cache.admit(text).cached_tokens == 0
    again = cache.admit(text)
    if tokens_of(len(text)) <= capacity:
        assert again.cached_tokens == again.prompt_tokens and again.uncached_tokens == 0
    else:  # what is kept of a prompt too big for the cache is a run of its leading whole blocks
        assert again.cached_tokens % BLOCK_TOKENS == 0
        assert again.cached_tokens <= capacity < again.cached_tokens + BLOCK_TOKENS


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=8),
    st.text(alphabet="xy", min_size=1, max_size=600),
    st.text(alphabet="xy", min_size=1, max_size=600),
)
def test_a_prompt_sharing_k_leading_blocks_hits_exactly_k(k: int, tail_seen: str, tail_new: str) -> None:
    head = "".join(block(chr(ord("a") + i)) for i in range(k))
    seen, new = head + "S" + tail_seen, head + "N" + tail_new  # they differ in the block after the k
    cache = PrefixCache(100 * BLOCK_TOKENS)
    cache.admit(seen)
    assert cache.admit(new).cached_tokens == k * BLOCK_TOKENS


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_a_block_only_matches_after_the_same_history(first: str, second: str) -> None:
    head_seen, head_new = (first * BLOCK_CHARS)[:BLOCK_CHARS], (second * BLOCK_CHARS)[:BLOCK_CHARS]
    assume(head_seen != head_new)
    cache = PrefixCache(10_000)
    cache.admit(head_seen + block("z"))
    # Block 1 is the same text, but after another block 0: no hit at all.
    assert cache.admit(head_new + block("z")).cached_tokens == 0
    assert cache.admit(head_seen + block("z")).cached_tokens == 2 * BLOCK_TOKENS


# --- LRU order -------------------------------------------------------------------------------------


def test_the_least_recently_used_prompt_is_dropped_first() -> None:
    cache = PrefixCache(3 * BLOCK_TOKENS)
    for letter in "abc":
        cache.admit(block(letter))
    cache.admit(block("a"))  # a is now the most recent
    cache.admit(block("d"))  # full: b, the least recently used, goes
    assert cache.match(block("b")) == 0
    assert [cache.match(block(x)) for x in "acd"] == [BLOCK_TOKENS] * 3
    assert cache.tokens == 3 * BLOCK_TOKENS and len(cache) == 3


def test_a_prompt_loses_its_tail_before_its_head() -> None:
    cache = PrefixCache(3 * BLOCK_TOKENS)
    cache.admit(block("a") + block("b"))  # two blocks of one prompt: the tail counts as older
    cache.admit(block("c"))
    cache.admit(block("d"))  # full: the tail of a+b goes, its head stays
    assert cache.match(block("a") + block("b")) == BLOCK_TOKENS
    assert cache.match(block("c")) == cache.match(block("d")) == BLOCK_TOKENS


def test_a_hit_refreshes_the_blocks_it_used() -> None:
    cache = PrefixCache(3 * BLOCK_TOKENS)
    cache.admit(block("s") + block("a"))  # a system prompt s, then a turn
    cache.admit(block("x"))
    cache.admit(block("y"))  # full: a goes; s, x, y are left, s the oldest
    cache.admit(block("s") + block("b"))  # hits s and makes it the newest: x goes, not s
    assert cache.match(block("s") + block("a")) == BLOCK_TOKENS
    assert cache.match(block("x")) == 0
    assert cache.match(block("y")) == BLOCK_TOKENS
    assert cache.match(block("s") + block("b")) == 2 * BLOCK_TOKENS


def test_memory_stays_flat_over_a_long_run() -> None:
    cache = PrefixCache(50 * BLOCK_TOKENS)
    for i in range(5000):
        cache.admit(f"c{i:07d}" * 64)  # two whole blocks, never seen before
        assert cache.tokens <= 50 * BLOCK_TOKENS
    assert len(cache) <= 50


# --- prefill ---------------------------------------------------------------------------------------


def test_without_a_cache_every_token_costs_and_nothing_is_counted() -> None:
    prefill = Prefill(ms_per_1k_tokens=200.0, cache_tokens=0)
    text = "q" * 4000  # 1000 tokens
    assert prefill.run([text]) == pytest.approx(0.2)
    assert prefill.run([text]) == pytest.approx(0.2)  # no cache: a repeat costs the same
    assert (prefill.queries, prefill.hits) == (0, 0)
    assert Prefill(0.0, 0).run([text]) == 0.0


def test_prefill_charges_exactly_the_uncached_tokens_and_counts_them() -> None:
    prefill = Prefill(ms_per_1k_tokens=100.0, cache_tokens=100_000)
    system = "s" * (4 * BLOCK_CHARS)  # 256 tokens, four whole blocks
    first = system + "u" * 100  # +25 tokens, a partial block
    second = first + "v" * 40  # +10 tokens: the partial block differs now, so it is recomputed
    assert prefill.run([first]) == pytest.approx(281 * 100 / 1e6)
    assert (prefill.queries, prefill.hits) == (281, 0)
    assert prefill.run([second]) == pytest.approx((291 - 256) * 100 / 1e6)
    assert (prefill.queries, prefill.hits) == (281 + 291, 256)
    assert prefill.run([second]) == 0.0  # seen whole: a full hit
    assert (prefill.queries, prefill.hits) == (281 + 2 * 291, 256 + 291)


def test_prompts_of_one_request_are_prefilled_in_order() -> None:
    prefill = Prefill(ms_per_1k_tokens=1000.0, cache_tokens=10_000)
    text = "p" * 4000  # 1000 tokens
    # The second copy hits what the first just computed: one second of prefill, not two.
    assert prefill.run([text, text]) == pytest.approx(1.0)
    assert (prefill.queries, prefill.hits) == (2000, 1000)


# --- the prompt text of a request ------------------------------------------------------------------


def test_each_turn_of_a_chat_starts_with_the_text_of_the_turn_before() -> None:
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "again"},
    ]
    texts = [simapi.chat_prompt_text(turns[:i]) for i in range(len(turns) + 1)]
    assert texts[0] == ""
    assert texts[2] == "system: You are terse.\nuser: a\nb\n"
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(turns)))


def test_a_request_carries_its_prompt_texts() -> None:
    def parse(body: dict[str, object], chat: bool = False) -> simapi.Generation:
        return simapi.parse_generation(body, chat=chat, default_model="m", now=0)

    batch = parse({"prompt": ["x" * 8, "y" * 9], "n": 2})
    assert batch.prompts == ("x" * 8, "y" * 9) and batch.prompt_tokens == 2 + 3 and batch.choices == 4
    ids = parse({"prompt": [[1, 2, 3], [2**40, -1]]})
    assert [len(p) for p in ids.prompts] == [12, 8] and ids.prompt_tokens == 5  # four characters per id
    assert parse({"prompt": [7, 8]}).prompts == parse({"prompt": [[7, 8]]}).prompts
    assert parse({}).prompts == ("",) and parse({}).prompt_tokens == 1
    chat = parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert chat.prompts == ("user: hi\n",) and chat.prompt_tokens == 3
    with pytest.raises(simapi.RequestError):
        parse({"prompt": [[1, True]]})
