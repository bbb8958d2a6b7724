"""gpud.cluster.workers: which models stay registered, and the plan that makes the gateway's list match.

Both are pure, so they are checked exhaustively: every model state against the rule, and arbitrary gateway
lists (ours, somebody else's, draining, stale labels, duplicates) against the plan until it converges.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.cluster.settings import NODE_LABEL, ClusterSettings
from gpud.cluster.workers import (
    DRAINING,
    Desired,
    Listed,
    ModelView,
    Plan,
    desired_worker,
    keep_registered,
    plan,
    wanted_names,
    worker_url,
)
from gpud.registry import ModelState

NODE = "http://10.0.0.5:8000"
OTHER = "http://10.0.0.6:8000"
SETTINGS = ClusterSettings(gateway="http://gw:30000", advertise=NODE, labels={"zone": "a"})
STATES = [s.value for s in ModelState] + ["idle"]


# ---- the rule: which models stay registered --------------------------------------------------------------


@pytest.mark.parametrize(("state", "ready", "before"), list(itertools.product(STATES, [0, 1, 2], [False, True])))
def test_keep_registered_for_every_state(state: str, ready: int, before: bool) -> None:
    expected = state not in ("stopping", "failed") and (ready > 0 or state == "idle" or before)
    assert keep_registered(state, ready, before) is expected


def test_a_model_is_registered_from_its_first_ready_replica_until_it_stops_or_fails() -> None:
    life = [("starting", 0), ("starting", 1), ("running", 2), ("degraded", 0), ("starting", 0), ("running", 1),
            ("failed", 0), ("starting", 0), ("running", 1), ("stopping", 0)]
    seen = []
    wanted: frozenset[str] = frozenset()
    for state, ready in life:
        wanted = wanted_names([ModelView("m", state, ready)], wanted)
        seen.append("m" in wanted)
    # Not while it first starts; kept through a restart or crash loop (degraded, starting again) once it has
    # been ready; gone when it fails for good, back once ready again, gone when it stops.
    assert seen == [False, True, True, True, True, True, False, False, True, False]


def test_an_idle_model_is_registered_without_a_replica() -> None:
    assert wanted_names([ModelView("m", "idle", 0)], frozenset()) == {"m"}


def test_a_model_that_left_the_registry_is_not_wanted() -> None:
    assert wanted_names([ModelView("b", "running", 1)], {"a", "b"}) == {"b"}


# ---- the registration body -------------------------------------------------------------------------------


def test_desired_worker_body() -> None:
    want = desired_worker(SETTINGS, "Qwen/Qwen2.5-7B", "proxy-key")
    assert want.url == "http://10.0.0.5:8000/m/Qwen%2FQwen2.5-7B" == worker_url(NODE, "Qwen/Qwen2.5-7B")
    assert want.body == {
        "url": want.url,
        "models": [{"id": "Qwen/Qwen2.5-7B"}],
        "runtime_type": "vllm",
        "labels": {"zone": "a", NODE_LABEL: NODE},
        "health": {"check_interval_secs": 5, "timeout_secs": 5, "failure_threshold": 2, "success_threshold": 1},
        "api_key": "proxy-key",
    }
    assert "api_key" not in desired_worker(SETTINGS, "m", None).body


# ---- the plan ----------------------------------------------------------------------------------------------


def want(name: str) -> Desired:
    return desired_worker(SETTINGS, name, None)


def ours(name: str, status: str = "ready", wid: str | None = None, **labels: str) -> Listed:
    return Listed(wid or f"id-{name}", worker_url(NODE, name), status,
                  {"zone": "a", NODE_LABEL: NODE, "served_model_name": name, **labels})


def test_an_empty_gateway_gets_every_desired_worker() -> None:
    work = plan([want("a"), want("b")], [], NODE)
    assert [d.name for d in work.register] == ["a", "b"] and not work.remove and not work.settled


def test_a_gateway_that_matches_needs_nothing() -> None:
    listed = [ours("a"), ours("b", status="not_ready"), Listed("x", worker_url(OTHER, "a"), "ready", {NODE_LABEL: OTHER})]
    work = plan([want("a"), want("b")], listed, NODE)
    assert work.settled and not work.register and not work.remove and not work.conflicts
    assert [(d.name, w.id) for d, w in work.registered] == [("a", "id-a"), ("b", "id-b")]


def test_workers_of_ours_that_are_not_served_here_go_and_nobody_elses_do() -> None:
    foreign = Listed("f", "http://elsewhere:1/m/z", "ready", {NODE_LABEL: OTHER})
    unlabelled = Listed("u", "http://elsewhere:2", "ready", {})
    work = plan([want("a")], [ours("a"), ours("gone"), foreign, unlabelled], NODE)
    assert [w.id for w in work.remove] == ["id-gone"]


def test_a_draining_worker_is_waited_for_not_registered_again() -> None:
    # The gateway refuses a second worker at a URL (409) until its drained one is gone.
    work = plan([want("a")], [ours("a", status=DRAINING)], NODE)
    assert not work.register and not work.remove and [d.name for d in work.waiting] == ["a"]
    assert plan([], [ours("a", status=DRAINING)], NODE).settled  # and one that is not wanted just goes


def test_a_worker_registered_with_other_labels_is_replaced() -> None:
    work = plan([want("a")], [ours("a", zone="b")], NODE)
    assert [w.id for w in work.remove] == ["id-a"] and [d.name for d in work.waiting] == ["a"]


def test_a_duplicate_of_ours_is_removed() -> None:
    work = plan([want("a")], [ours("a", wid="1"), ours("a", wid="2")], NODE)
    assert [w.id for _, w in work.registered] == ["1"] and [w.id for w in work.remove] == ["2"]


def test_a_url_held_by_somebody_else_is_a_conflict() -> None:
    squatter = Listed("s", worker_url(NODE, "a"), "ready", {"owner": "manual"})
    work = plan([want("a")], [squatter], NODE)
    assert not work.register and not work.remove and [(d.name, w.id) for d, w in work.conflicts] == [("a", "s")]


def test_a_pending_registration_is_not_sent_twice() -> None:
    work = plan([want("a"), want("b")], [], NODE, pending={worker_url(NODE, "a")})
    assert [d.name for d in work.register] == ["b"] and [d.name for d in work.pending] == ["a"]


# ---- the plan converges on any gateway -------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
STATUSES = st.sampled_from(["ready", "not_ready", "pending", DRAINING])


@st.composite
def gateway_lists(draw: st.DrawFn) -> list[Listed]:
    listed: list[Listed] = []
    for i in range(draw(st.integers(0, 8))):
        name = draw(NAMES)
        owner = draw(st.sampled_from(["ours", "ours-stale", "other-node", "unlabelled"]))
        status = draw(STATUSES)
        if owner == "ours":
            listed.append(ours(name, status=status, wid=f"w{i}"))
        elif owner == "ours-stale":
            listed.append(ours(name, status=status, wid=f"w{i}", zone="old"))
        elif owner == "other-node":
            listed.append(Listed(f"w{i}", worker_url(OTHER, name), status, {NODE_LABEL: OTHER}))
        else:
            listed.append(Listed(f"w{i}", f"http://manual:9/{name}", status, {}))
    return listed


def apply(work: Plan, listed: list[Listed], step: int) -> list[Listed]:
    """What a gateway does with the plan: removed workers drain, registered ones appear; then drained go."""
    removed = {w.id for w in work.remove}
    after = [w._replace(status=DRAINING) if w.id in removed else w for w in listed if w.status != DRAINING]
    after += [Listed(f"new{step}-{d.name}", d.url, "ready", {**d.labels, "served_model_name": d.name})
              for d in work.register]
    return after


@settings(max_examples=300, deadline=None)
@given(listed=gateway_lists(), names=st.sets(NAMES))
def test_the_plan_converges_and_touches_only_our_workers(listed: list[Listed], names: set[str]) -> None:
    desired = [want(n) for n in sorted(names)]
    others = [w for w in listed if w.labels.get(NODE_LABEL) != NODE]
    for step in range(4):
        work = plan(desired, listed, NODE)
        assert all(w.labels.get(NODE_LABEL) == NODE for w in work.remove)
        assert len({d.url for d in work.register}) == len(work.register)
        listed = apply(work, listed, step)
    final = plan(desired, listed, NODE)
    assert final.settled, final
    live_ours = {w.url for w in listed if w.labels.get(NODE_LABEL) == NODE and w.status != DRAINING}
    conflicted = {d.url for d, _ in final.conflicts}
    assert live_ours == {d.url for d in desired} - conflicted
    # Nobody else's worker was ever removed.
    assert [w for w in listed if w.labels.get(NODE_LABEL) != NODE] == [w for w in others if w.status != DRAINING]
