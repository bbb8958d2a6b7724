"""gpud.proxy.paths: the per-model routes of SPEC §16 as pure functions, checked exhaustively."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.proxy.paths import ModelPath, model_health, model_prefix, split_model_path
from gpud.registry import ModelState


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/m/demo/v1/chat/completions", ModelPath("demo", "/v1/chat/completions")),
        ("/m/demo/health", ModelPath("demo", "/health")),
        ("/m/demo", ModelPath("demo", "/")),
        ("/m/demo/", ModelPath("demo", "/")),
        ("/m/Qwen%2FQwen2.5-7B/v1/models", ModelPath("Qwen/Qwen2.5-7B", "/v1/models")),
        ("/m/a%20b/x?y=1&z=%2F", ModelPath("a b", "/x?y=1&z=%2F")),  # the query string goes on unchanged
        ("/m/demo?x=1", ModelPath("demo", "/?x=1")),
        ("/m/demo/v1/a%2Fb", ModelPath("demo", "/v1/a%2Fb")),  # the rest stays encoded, as the client sent it
        ("/m//v1/models", ModelPath("", "/v1/models")),  # no name: no model has it, so a 404
        ("/m/", ModelPath("", "/")),
    ],
)
def test_split_model_path(raw: str, expected: ModelPath) -> None:
    assert split_model_path(raw) == expected


@pytest.mark.parametrize("raw", ["/v1/models", "/m", "/mm/demo/x", "/health", "/metrics", "/M/demo/x", "", "m/demo"])
def test_paths_that_are_not_per_model_routes(raw: str) -> None:
    assert split_model_path(raw) is None


@given(name=st.text(min_size=1, max_size=40), rest=st.sampled_from(["/health", "/v1/chat/completions", "/", "/a/b?c=d"]))
def test_a_prefix_splits_back_into_its_name(name: str, rest: str) -> None:
    # Whatever the name holds ("/", "?", "%", spaces, non-ASCII), its prefix splits back into it.
    assert split_model_path(model_prefix(name) + rest) == ModelPath(name, rest)


STATES = [s.value for s in ModelState] + ["idle"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("ready", [0, 1, 3])
def test_model_health_for_every_state(state: str, ready: int) -> None:
    status, body = model_health("demo", state, ready)
    healthy = state != "stopping" and (ready > 0 or state == "idle")
    assert status == (200 if healthy else 503)
    assert body["model"] == "demo" and body["state"] == state and body["ready"] == ready
    assert body["status"] == ("ok" if healthy else "unavailable")


def test_model_health_of_an_unknown_model_is_404() -> None:
    assert model_health("nope", None, 0) == (404, {"status": "not_found", "model": "nope"})


def test_idle_counts_as_healthy_and_stopping_never_does() -> None:
    # SPEC §16: an idle model is woken by a request, so the gateway may send it one; a stopping one drains.
    assert model_health("m", "idle", 0).status == 200
    assert model_health("m", ModelState.STOPPING.value, 2).status == 503
    assert model_health("m", ModelState.STARTING.value, 0).status == 503
    assert model_health("m", ModelState.DEGRADED.value, 1).status == 200
