"""Control API fuzzing beyond POST /v1/models (issue #6): PATCH, restart, plan, logs and events parameters, and
model names in paths. Never a 5xx, and an invalid request changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from helpers import Daemon, control_connection
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpud.cli.client import model_path

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
RAW_BODIES = st.binary(max_size=40) | st.just(b"") | st.just(b"{") | st.just(b"\xff\xfe")
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def call(daemon: Daemon, method: str, path: str, body: bytes | None = None) -> int:
    """The status of one request over the control socket; streamed bodies are not read (closing ends them)."""
    conn = control_connection(daemon)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status >= 400:
            error = json.loads(resp.read())["error"]  # errors are always JSON with a code and a sentence
            assert error["code"] and error["message"], error
        return resp.status
    finally:
        conn.close()


def snapshot(daemon: Daemon) -> Any:
    """What an invalid request must not change: models, replicas and their processes, the ledger."""
    models = [
        (m["name"], m["state"], m["replicas_desired"],
         [(r["index"], r["pid"], r["state"], r["restarts"]) for r in m["replicas"]])
        for m in daemon.client.request("GET", "/v1/models")["models"]
    ]
    ledger = [g["reserved_bytes"] for g in daemon.client.request("GET", "/v1/gpus")["gpus"]]
    return models, ledger


@pytest.fixture(scope="module")
def api_daemon(fuzz_daemon: Daemon) -> Iterator[Daemon]:
    fuzz_daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "args": ["--startup-s", "0.05"]})
    yield fuzz_daemon


def refused_without_change(daemon: Daemon, method: str, path: str, body: bytes | None) -> None:
    before = snapshot(daemon)
    status = call(daemon, method, path, body)
    assert 400 <= status < 500, (method, path, body, status)
    assert snapshot(daemon) == before


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


@FUZZ
@given(body=JSON | st.fixed_dictionaries({"replicas": JSON}))
def test_patch_bodies_other_than_a_replica_count_are_refused(api_daemon: Daemon, body: Any) -> None:
    replicas = body.get("replicas") if isinstance(body, dict) and set(body) == {"replicas"} else None
    assume(not (type(replicas) is int and 1 <= replicas <= 1024))  # those are valid: a scale
    refused_without_change(api_daemon, "PATCH", model_path("m"), encode(body))


@FUZZ
@given(body=RAW_BODIES)
def test_patch_with_raw_garbage_is_refused(api_daemon: Daemon, body: bytes) -> None:
    try:
        valid = set(json.loads(body)) == {"replicas"}
    except (ValueError, TypeError):
        valid = False
    assume(not valid)
    refused_without_change(api_daemon, "PATCH", model_path("m"), body)


@FUZZ
@given(body=JSON | st.fixed_dictionaries({"rolling": JSON}))
def test_restart_bodies_other_than_rolling_true_or_false_are_refused(api_daemon: Daemon, body: Any) -> None:
    assume(body != {} and not (isinstance(body, dict) and set(body) == {"rolling"}
                               and isinstance(body["rolling"], bool)))
    refused_without_change(api_daemon, "POST", model_path("m", "restart"), encode(body))


@FUZZ
@given(body=JSON | st.dictionaries(st.sampled_from(["replicas", "vram", "gpu_idx", "placement", "engine",
                                                   "gpus_per_replica", "model"]), JSON, max_size=4))
def test_plan_never_fails_and_changes_nothing(api_daemon: Daemon, body: Any) -> None:
    before = snapshot(api_daemon)
    status = call(api_daemon, "POST", "/v1/plan", encode(body))
    assert status in (200, 422), (body, status)
    assert snapshot(api_daemon) == before


QUERY = st.dictionaries(st.sampled_from(["replica", "lines", "follow", "model", "x"]),
                        st.text(max_size=12) | st.integers(-2**70, 2**70).map(str), max_size=4)


@FUZZ
@given(query=QUERY, events=st.booleans())
def test_logs_and_events_query_parameters_never_fail(api_daemon: Daemon, query: dict[str, str],
                                                     events: bool) -> None:
    path = "/v1/events" if events else model_path("m", "logs")
    before = snapshot(api_daemon)
    status = call(api_daemon, "GET", f"{path}?{urlencode(query)}")
    assert status in (200, 404, 422), (path, query, status)
    assert snapshot(api_daemon) == before


@FUZZ
@given(name=st.text(max_size=30), method=st.sampled_from(["GET", "PATCH", "DELETE", "POST", "PUT"]),
       suffix=st.sampled_from(["", "/restart", "/logs", "/x", "/%2F", "/%00"]))
def test_unknown_model_paths_are_404_or_refused(api_daemon: Daemon, name: str, method: str, suffix: str) -> None:
    assume(name != "m")
    path = "/v1/models/" + quote(name, safe="") + suffix
    before = snapshot(api_daemon)
    status = call(api_daemon, method, path, b'{"replicas": 2}' if method in ("PATCH", "POST") else None)
    assert 400 <= status < 500, (method, path, status)
    assert snapshot(api_daemon) == before
