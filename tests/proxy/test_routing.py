"""gpud.proxy.routing: session and prefix policies with bounded load and bounded tables (pure, property-tested)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.proxy.routing import (
    BLOCK_CHARS,
    PREFIX_BLOCKS,
    Outcome,
    PrefixTable,
    SessionTable,
    block_hashes,
    load_limit,
    prompt_text,
    session_key,
)
from gpud.proxy.table import ReplicaRoute
from gpud.registry import ReplicaState

READY = ReplicaState.READY.value


def replicas(n: int, down: tuple[int, ...] = ()) -> list[ReplicaRoute]:
    """Ready replicas 0..n-1 (those in `down` are left out, as the table leaves out what is not ready)."""
    return [ReplicaRoute(i, 1000 + i, i, READY) for i in range(n) if i not in down]


def test_the_load_bound() -> None:
    assert load_limit([0, 0, 0]) == 1  # idle: a replica with 2 in flight is overloaded
    assert load_limit([4, 4, 4]) == 6
    assert load_limit([8, 0, 0]) == math.ceil(1.25 * 8 / 3) + 1 == 5
    assert load_limit([]) == 0


def test_a_session_sticks_until_its_replica_is_overloaded_or_gone_then_follows_the_new_one() -> None:
    table, load = SessionTable(), {0: 0, 1: 0, 2: 0}
    ready = replicas(3)
    first, cursor, outcome = table.choose(("m", "alice"), ready, load.__getitem__, 0)
    assert (first, outcome) == (ready[0], Outcome.MISS)  # least connections for a new key
    table.served(("m", "alice"), 0)
    load[0] = 1
    assert table.choose(("m", "alice"), ready, load.__getitem__, cursor)[::2] == (ready[0], Outcome.HIT)
    load[0] = 3  # mean 1, limit ceil(1.25)+1 = 3: 3 is not above it
    assert table.choose(("m", "alice"), ready, load.__getitem__, cursor)[2] is Outcome.HIT
    load[0] = 4  # mean 4/3, limit ceil(1.67)+1 = 3: overloaded
    moved, _, outcome = table.choose(("m", "alice"), ready, load.__getitem__, cursor)
    assert outcome is Outcome.OVERFLOW and moved is not None and moved.index != 0
    table.served(("m", "alice"), moved.index)
    load[0] = 0
    assert table.choose(("m", "alice"), ready, load.__getitem__, cursor)[0] == moved  # it follows the new one
    # The bound replica is not ready (not in the ready list): least connections, the key moves.
    gone, _, outcome = table.choose(("m", "alice"), replicas(3, down=(moved.index,)), load.__getitem__, 0)
    assert outcome is Outcome.OVERFLOW and gone is not None and gone.index != moved.index
    assert table.choose(None, ready, load.__getitem__, 0)[2] is Outcome.MISS  # no key: least connections


def test_the_longest_prefix_wins_and_a_shorter_one_takes_over_when_it_is_overloaded() -> None:
    table, load = PrefixTable(1000), {0: 0, 1: 0, 2: 0}
    ready = replicas(3)
    system = "s" * BLOCK_CHARS * 2
    short = block_hashes("m", system)  # 2 blocks
    long = block_hashes("m", system + "conversation A " * 40)
    assert long[:2] == short and len(long) > 2
    table.served(short, 1)
    table.served(long, 2)
    assert table.choose(long, ready, load.__getitem__, 0)[::2] == (ready[2], Outcome.HIT)
    assert table.choose(short, ready, load.__getitem__, 0)[::2] == (ready[2], Outcome.HIT)  # 2 served it last
    table.served(short, 1)
    assert table.choose(short, ready, load.__getitem__, 0)[0] == ready[1]
    load[2] = 5  # replica 2 overloaded: the longest run it holds is passed over for the next one, on 1
    assert table.choose(long, ready, load.__getitem__, 0)[::2] == (ready[1], Outcome.HIT)
    other = block_hashes("m", "t" * BLOCK_CHARS * 3)
    assert table.choose(other, ready, load.__getitem__, 0)[2] is Outcome.MISS
    load[1] = 9  # mean 14/3, limit ceil(5.8)+1 = 7: both replicas that hold a prefix are overloaded
    assert table.choose(short, ready, load.__getitem__, 0)[::2] == (ready[0], Outcome.OVERFLOW)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 50),
    served=st.lists(st.tuples(st.lists(st.integers(), max_size=8), st.integers(0, 3)), max_size=60),
)
def test_the_prefix_table_never_holds_more_than_its_bound(limit: int, served: list[tuple[list[int], int]]) -> None:
    table = PrefixTable(limit)
    for hashes, index in served:
        table.served(hashes, index)
        assert len(table) <= limit
    if served and served[-1][0]:  # what was served last is remembered
        assert table.choose(served[-1][0], replicas(4), lambda slot: 0, 0)[0] == replicas(4)[served[-1][1]]


@settings(max_examples=300, deadline=None)
@given(
    loads=st.lists(st.integers(0, 10), min_size=1, max_size=6),
    bound=st.integers(0, 5),
    down=st.sets(st.integers(0, 5)),
    exclude=st.sets(st.integers(0, 5)),
    policy=st.sampled_from(["session", "prefix"]),
)
def test_a_choice_is_ready_not_excluded_and_a_hit_is_never_overloaded(
    loads: list[int], bound: int, down: set[int], exclude: set[int], policy: str
) -> None:
    ready = replicas(len(loads), down=tuple(down))
    inflight = dict(enumerate(loads)).__getitem__
    table: SessionTable | PrefixTable = SessionTable() if policy == "session" else PrefixTable(100)
    key: object = ("m", "k") if policy == "session" else [1, 2, 3]
    table.served(key, bound)  # type: ignore[arg-type]
    chosen, _, outcome = table.choose(key, ready, inflight, 0, tuple(exclude))  # type: ignore[arg-type]
    allowed = [r for r in ready if r.index not in exclude]
    if not allowed:
        assert chosen is None
        return
    assert chosen in allowed
    if outcome is Outcome.HIT:
        assert chosen.index == bound and loads[bound] <= load_limit([loads[r.index] for r in ready])


def test_what_a_body_is_keyed_by() -> None:
    assert session_key(b"s-1", {"user": "u"}) == "s-1"  # the header wins
    assert session_key(None, {"user": "u"}) == "u"
    assert session_key(None, {"user": 7}) is None and session_key(None, None) is None
    assert prompt_text({"prompt": "hello"}) == "hello"
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1,2,3"
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(chat) == "system\x1fbe brief\x1euser\x1fhi\x1e"
    for bad in (None, [], {"messages": "x"}, {"messages": [1]}, {"other": 1}, {"prompt": {"a": 1}}):
        assert prompt_text(bad) is None


def test_prefix_hashes_share_a_history_and_stop_at_the_block_limit() -> None:
    a = block_hashes("m", "x" * BLOCK_CHARS * 3 + "A" * BLOCK_CHARS)
    b = block_hashes("m", "x" * BLOCK_CHARS * 3 + "B" * BLOCK_CHARS)
    assert a[:3] == b[:3] and a[3] != b[3]
    assert block_hashes("other", "x" * BLOCK_CHARS * 3)[0] != a[0]  # another model's table entries never meet
    assert len(block_hashes("m", "x" * (BLOCK_CHARS - 1))) == 0  # a partial block is not a block
    huge = "y" * BLOCK_CHARS * (PREFIX_BLOCKS + 50)
    assert len(block_hashes("m", huge)) == PREFIX_BLOCKS
    assert len(prompt_text({"prompt": huge}) or "") == BLOCK_CHARS * PREFIX_BLOCKS  # never copied whole


@pytest.mark.parametrize("n", [1, 2])
def test_one_ready_replica_is_the_choice_whatever_its_load(n: int) -> None:
    table = SessionTable()
    table.served(("m", "k"), 0)
    chosen, _, _ = table.choose(("m", "k"), replicas(n), lambda slot: 50 if slot == 0 else 0, 0)
    assert chosen is not None and (chosen.index == 0 if n == 1 else chosen.index == 1)
