"""Faults and hostile input (issue #6): nothing lost, nothing leaked, never a 500 for bad input."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

from helpers import Daemon, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.errors import GpudError, InvalidInput
from gpud.spec import ModelSpec
from gpud.supervise.supervisor import INSTANCE_ENV

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["name", "model", "engine", "replicas", "gpus_per_replica", "vram", "gpu_idx", "placement", "env",
          "unset_env", "venv", "args", "command", "health_path", "start_timeout_sec"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON


@settings(max_examples=400, deadline=None, derandomize=True)
@given(BODIES)
def test_spec_validation_only_ever_says_invalid(body: object) -> None:
    try:
        ModelSpec.from_json(body)
    except InvalidInput as exc:
        assert exc.message and "\n" not in exc.message
    # anything else (TypeError, KeyError, OverflowError…) fails the test: it would be a 500


def test_processes_of_a_previous_life_are_stopped_before_memory_counts_as_free(make_daemon) -> None:
    daemon = make_daemon()
    # A replica process that survived an earlier daemon on this state dir (it should not, but if it did).
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                env={INSTANCE_ENV: daemon.instance, "GPUD_MODEL": "old"}, start_new_session=True)
    try:
        wait_until(lambda: survivor.pid in daemon.replica_pids(), 10, "the survivor to be visible")
        daemon.start()
        assert survivor.wait(10) is not None
        assert "left by a previous gpud" in daemon.log_text()
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_fuzzed_start_requests_never_500_and_refusals_change_nothing(fuzz_daemon: Daemon, body: object) -> None:
    before = fuzz_daemon.client.request("GET", "/v1/gpus")
    try:
        shown = fuzz_daemon.client.request("POST", "/v1/models", body)  # type: ignore[arg-type]
    except GpudError as exc:
        assert exc.code in ("invalid", "does_not_fit", "conflict"), exc.message
        assert fuzz_daemon.client.request("GET", "/v1/gpus") == before
        assert fuzz_daemon.client.request("GET", "/v1/models") == {"models": []}
        return
    # Valid by chance (e.g. {"model": "0"} with the vllm engine, which does not exist here): clean up.
    fuzz_daemon.client.request("DELETE", f"/v1/models/{shown['name'].replace('/', '%2F')}")
    fuzz_daemon.wait_removed(shown["name"])


def test_env_values_round_trip_exactly(daemon: Daemon) -> None:
    tricky = "line1\nline2\t$(rm -rf /) `x` 'q' \"dq\" \\ " + string.printable
    shown = daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "env": {"TRICKY": tricky}})
    raw = Path(f"/proc/{shown['replicas'][0]['pid']}/environ").read_bytes().split(b"\0")
    assert b"TRICKY=" + tricky.encode() in raw
    assert json.loads(json.dumps(shown))["env"]["TRICKY"] == tricky


def test_secrets_never_reach_show_or_the_daemon_log(daemon: Daemon) -> None:
    daemon.start_model({"model": "m", "engine": "sim", "vram": "1GiB", "env": {"HF_TOKEN": "sekrit-value-1234"}})
    assert "sekrit" not in json.dumps(daemon.show("m"))
    assert "sekrit" not in daemon.cli("model", "show", "m").stdout
    assert "sekrit" not in daemon.log_text()
