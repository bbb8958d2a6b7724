"""The CLI without a daemon: parsing into request bodies, client-side checks, renderers, local plans.

A check that fails client-side exits 2 before any request: the socket given here does not exist, so a
request would have exited 3 instead.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gpud.cli import commands, parser, render, requests
from gpud.cli import main as cli

NO_DAEMON = "/nonexistent/gpud.sock"


def body(*argv: str) -> dict[str, Any]:
    return requests.start_body(parser.parse(["model", "start", *argv]))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--socket", NO_DAEMON, *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- parsing → request bodies ------------------------------------------------------------------------


def test_minimal_start_body() -> None:
    assert body("Qwen/Qwen2.5-7B-Instruct") == {
        "name": "Qwen/Qwen2.5-7B-Instruct", "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "vllm", "replicas": 1,
    }


def test_every_start_flag() -> None:
    assert body(
        "meta/llama", "--name", "llama", "--engine", "sim", "--replicas", "3", "--gpus-per-replica", "2",
        "--vram", "1.5GiB", "--gpu-idx", "0, 2,3", "--placement", "pack",
        "-e", "A=1", "--env", "URL=http://x/?a=b=c", "-e", "A=2", "-e", "EMPTY=",
        "--unset-env", "HTTP_PROXY", "--unset-env", "NO_PROXY",
        "--venv-package", "vllm==0.6.3", "--venv-package", "numpy<2",
        "--no-wait", "--timeout", "60", "-o", "json",
        "--", "--max-model-len", "4096", "-e", "--", "x y",
    ) == {
        "name": "llama",
        "model": "meta/llama",
        "engine": "sim",
        "replicas": 3,
        "gpus_per_replica": 2,
        "vram": "1.5GiB",  # sent as typed: the daemon parses it
        "gpu_idx": [0, 2, 3],
        "placement": "pack",
        "env": {"A": "2", "URL": "http://x/?a=b=c", "EMPTY": ""},
        "unset_env": ["HTTP_PROXY", "NO_PROXY"],
        "venv": {"packages": ["vllm==0.6.3", "numpy<2"]},
        "args": ["--max-model-len", "4096", "-e", "--", "x y"],
    }


def test_readiness_flags_for_servers_without_health() -> None:
    sent = body("m", "--engine", "command", "--command", "srv --port {port}", "--health-path", "/v1/models",
                "--start-timeout", "90")
    assert (sent["health_path"], sent["start_timeout_sec"]) == ("/v1/models", 90.0)


def test_a_local_path_is_made_absolute_and_names_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    (tmp_path / "Qwen2.5-0.5B").mkdir()
    monkeypatch.chdir(tmp_path)
    assert body("./tiny.gguf", "--engine", "sim") | {} == {
        "name": "tiny", "model": str(tmp_path / "tiny.gguf"), "engine": "sim", "replicas": 1}
    # A bare word that names a directory here is a path too (as vLLM decides), and a trailing / is fine.
    assert body("Qwen2.5-0.5B/", "--engine", "sim")["model"] == str(tmp_path / "Qwen2.5-0.5B")
    assert body("Qwen2.5-0.5B", "--engine", "sim", "--name", "q")["name"] == "q"
    # A Hugging Face id that is not a local directory stays as it is.
    assert body("Qwen/Qwen2.5-0.5B", "--engine", "sim")["model"] == "Qwen/Qwen2.5-0.5B"


def test_wait_and_output_flags_are_parsed() -> None:
    ns = parser.parse(["--socket", "/s", "model", "start", "m", "--no-wait", "--timeout", "5", "-o", "json"])
    assert (ns.socket, ns.no_wait, ns.timeout, ns.output) == ("/s", True, "5", "json")
    assert parser.parse(["model", "start", "m"]).engine_args is None


def test_socket_is_also_accepted_after_the_command() -> None:
    assert parser.parse(["model", "list", "--socket", "/s"]).socket == "/s"


def test_command_template_implies_the_command_engine() -> None:
    b = body("m", "--command", "llama-server --port {port} -m {model}")
    assert b["engine"] == "command" and b["command"] == "llama-server --port {port} -m {model}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "start", "m", "--replicas", "0"], "gpud: Invalid --replicas 0: expected a number of at least 1"),
        (["model", "start", "m", "--replicas", "two"], "gpud: Invalid --replicas 'two': expected a whole number."),
        (["model", "start", "m", "--gpus-per-replica", "0"], "gpud: Invalid --gpus-per-replica 0"),
        (["model", "start", "m", "--vram", "20 parsecs"], "gpud: Invalid --vram '20 parsecs'"),
        (["model", "start", "m", "--vram", "0"], "gpud: Invalid --vram '0': it must be more than 0 bytes."),
        (["model", "start", "m", "--gpu-idx", "0,x"], "gpud: Invalid --gpu-idx '0,x'"),
        (["model", "start", "m", "--gpu-idx", "1,1"], "gpud: Invalid --gpu-idx '1,1': GPU 1 is listed twice."),
        (["model", "start", "m", "-e", "NOVALUE"], "gpud: Invalid --env 'NOVALUE': expected KEY=VALUE."),
        (["model", "start", "m", "-e", "1BAD=x"], "gpud: Invalid --env name '1BAD'"),
        (["model", "start", "m", "-e", "CUDA_VISIBLE_DEVICES=1"], "gpud: CUDA_VISIBLE_DEVICES is managed by gpud"),
        (["model", "start", "m", "--unset-env", "GPUD_PORT"], "gpud: GPUD_PORT is managed by gpud"),
        (["model", "start", "../no-such-gpud-model"], "gpud: Invalid MODEL '../no-such-gpud-model': no such file"),
        (["model", "start", "m", "--name", ""], "gpud: Invalid --name ''"),
        (["model", "start", "m", "--start-timeout", "0"], "gpud: Invalid --start-timeout '0'"),
        (["model", "start", "m", "--name", "a//b"], "gpud: Invalid --name 'a//b'"),
        (["model", "start", "m", "--engine", "command"], "gpud: The command engine needs --command TEMPLATE"),
        (["model", "start", "m", "--engine", "sim", "--command", "x"], "gpud: --command only applies to"),
        (["model", "start", "m", "--timeout", "-1"], "gpud: Invalid --timeout '-1'"),
        (["model", "start", "m", "--venv-package", ""], "gpud: Invalid --venv-package"),
        (["model", "scale", "m", "--replicas", "0"], "gpud: Invalid --replicas 0: a model needs at least 1 replica"),
        (["model", "logs", "m", "--replica", "-1"], "gpud: Invalid --replica -1"),
        (["plan", "--headroom", "1GiB"], "gpud: --headroom only applies with --gpus"),
        (["model", "start", "m", "--engine", "tgi"], "gpud: Argument --engine: invalid choice: 'tgi'"),
        (["model", "start", "m", "--bogus"], "gpud: Unrecognized arguments: --bogus; see `gpud --help`."),
        (["model", "start"], "gpud: The following arguments are required: MODEL; see `gpud model start --help`."),
        (["model"], "gpud: The following arguments are required: ACTION"),
        ([], "gpud: The following arguments are required: COMMAND"),
        (["model", "list", "--", "x"], "gpud: Engine arguments after -- are only accepted by `gpud model start`"),
    ],
)
def test_invalid_input_exits_2_with_one_sentence_and_no_request(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1 and err.rstrip().endswith(".")


def test_unreachable_socket_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "model", "list")
    assert code == 3 and out == ""
    assert err == f"gpud: Cannot reach the gpud daemon at {NO_DAEMON}: the socket does not exist " \
                  "(is `gpud daemon` running?).\n"


def test_plan_without_daemon_hints_at_gpus_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--replicas", "2")
    assert code == 3 and "`gpud plan --gpus SPEC` needs none" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == "gpud 0.1.0\n"
    assert cli.main(["model", "start", "--help"]) == 0
    assert "-- ENGINE_ARGS" in capsys.readouterr().out


def test_daemon_gets_the_rest_of_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("gpud.daemon")
    fake.run_daemon = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpud.daemon", fake)
    assert cli.main(["daemon", "--gpus", "sim:2x24GiB", "--", "x"]) == 0
    assert cli.main(["--socket", "/s", "daemon", "--listen", "127.0.0.1:9"]) == 0
    assert seen == [["--gpus", "sim:2x24GiB", "--", "x"], ["--socket", "/s", "--listen", "127.0.0.1:9"]]


def test_unexpected_errors_are_one_sentence(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(_ns: Any) -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(commands, "cmd_read", boom)
    code, _, err = run(capsys, "status")
    assert code == 1
    assert err == "gpud: Unexpected error (RuntimeError: kaboom); set GPUD_DEBUG=1 to see the traceback.\n"


# ---- plan --gpus: no daemon --------------------------------------------------------------------------


def test_local_plan_spreads_three_replicas_on_two_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--replicas", "3", "--vram", "20GiB", "-o", "json")
    assert (code, err) == (0, "")
    plan = json.loads(out)
    assert plan["fits"] is True and plan["reason"] is None
    assert [(r["index"], r["gpus"], r["vram_bytes"]) for r in plan["replicas"]] == [
        (0, [0], 20 * 2**30), (1, [1], 20 * 2**30), (2, [0], 20 * 2**30),
    ]
    code, out, _ = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--replicas", "3", "--vram", "20GiB")
    assert code == 0 and out.endswith("GPU 0 hosts replicas 0, 2; GPU 1 hosts replica 1.\n")


def test_local_plan_that_does_not_fit_exits_4_with_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--replicas", "9", "--vram", "20GiB", "-o", "json")
    plan = json.loads(out)
    assert code == 4 and plan["fits"] is False and plan["replicas"] == []
    assert err == f"gpud: {plan['reason']}\n" and "room for 3 of the 9 replicas" in err
    code, out, err = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--replicas", "9", "--vram", "20GiB")
    assert code == 4 and out == "" and err.startswith("gpud: 9 replicas of 20 GiB do not fit")


def test_local_plan_honours_the_multi_replica_switch_and_headroom(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA", "0")
    code, _, err = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--replicas", "3", "--vram", "20GiB")
    assert code == 4 and "single-GPU-multi-replica is off" in err
    monkeypatch.delenv("GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA")
    code, out, _ = run(capsys, "plan", "--gpus", "sim:1x80GiB", "--headroom", "0", "--vram", "40GiB",
                       "--replicas", "2", "-o", "json")
    assert code == 0 and len(json.loads(out)["replicas"]) == 2


def test_local_plan_rejects_unknown_gpus_and_bad_specs(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--gpus", "sim:2x80GiB", "--gpu-idx", "5")
    assert code == 2 and "there is no GPU 5" in err
    code, _, err = run(capsys, "plan", "--gpus", "tpu:4")
    assert code == 2 and err.startswith("gpud: Invalid GPU spec 'tpu:4'")


# ---- renderers ---------------------------------------------------------------------------------------

REPLICAS = [
    {"index": 0, "state": "ready", "pid": 4242, "gpus": [0], "vram_bytes": 20 * 2**30, "port": 41234,
     "restarts": 0, "inflight": 3, "last_exit": None},
    {"index": 1, "state": "failed", "pid": None, "gpus": [0, 1], "vram_bytes": 512 * 2**20, "port": 0,
     "restarts": 6, "inflight": 0, "last_exit": {"code": None, "signal": "SIGKILL"}, "message": None},
]
SHOW = {
    "name": "demo", "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "vllm", "state": "degraded",
    "replicas_desired": 2, "replicas_ready": 1, "endpoint": "http://127.0.0.1:8000/v1",
    "env": {"HF_TOKEN": "***", "A": "1"}, "venv": {"path": "/v/abc", "packages": ["vllm==0.6.3"]},
    "replicas": REPLICAS, "busy": False,
}


def test_format_model_show() -> None:
    assert render.format_model_show(SHOW) == "\n".join([
        "Name:      demo",
        "Model:     Qwen/Qwen2.5-7B-Instruct",
        "Engine:    vllm",
        "State:     degraded",
        "Ready:     1/2 replicas",
        "Endpoint:  http://127.0.0.1:8000/v1",
        "Env:       HF_TOKEN=*** A=1",
        "Venv:      /v/abc (vllm==0.6.3)",
        "",
        "INDEX  STATE   PID   GPUS  VRAM     PORT   RESTARTS  INFLIGHT  LAST EXIT",
        "0      ready   4242  0     20 GiB   41234  0         3         -",
        "1      failed  -     0,1   512 MiB  -      6         0         SIGKILL",
        "",
        "replica 1: killed by SIGKILL (out of memory? stopped by another program?)",
    ])
    assert "an operation is in progress" in render.format_model_show({**SHOW, "busy": True})


def test_format_model_list() -> None:
    assert render.format_model_list({"models": []}) == "No models are running."
    assert render.format_model_list({"models": [SHOW, {**SHOW, "name": "b", "engine": "sim", "state": "running"}]}) == (
        "NAME  ENGINE  STATE     READY  ENDPOINT\n"
        "demo  vllm    degraded  1/2    http://127.0.0.1:8000/v1\n"
        "b     sim     running   1/2    http://127.0.0.1:8000/v1"
    )


def test_format_gpus() -> None:
    gpus = {"gpus": [
        {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-0", "total_bytes": 80 * 2**30,
         "used_by_others_bytes": 0, "reserved_bytes": 40 * 2**30, "available_bytes": 39 * 2**30 + 512 * 2**20,
         "replicas": [{"model": "demo", "index": 0}, {"model": "demo", "index": 2}], "ok": True},
        {"index": 1, "name": "NVIDIA H100", "uuid": "GPU-1", "total_bytes": 80 * 2**30,
         "used_by_others_bytes": 10 * 2**30, "reserved_bytes": 0, "available_bytes": 0, "replicas": [],
         "ok": False, "reason": "the GPU fell off the bus"},
    ]}
    assert render.format_gpus(gpus) == (
        "INDEX  NAME         TOTAL   USED-BY-OTHERS  RESERVED  AVAILABLE  REPLICAS\n"
        "0      NVIDIA H100  80 GiB  0 B             40 GiB    39.5 GiB   demo#0 demo#2\n"
        "1      NVIDIA H100  80 GiB  10 GiB          0 B       0 B        -\n"
        "\n"
        "GPU 1 is not usable: the GPU fell off the bus."
    )


def test_format_plan_status_and_venvs() -> None:
    assert render.format_plan({"fits": False, "replicas": [], "reason": "No room."}) == "Does not fit: No room."
    plan = {"fits": True, "reason": None, "replicas": [{"index": 0, "gpus": [0, 1], "vram_bytes": 2**30}]}
    assert render.format_plan(plan) == (
        "Fits: 1 replica.\n\nREPLICA  GPUS  VRAM\n0        0,1   1 GiB\n\nGPU 0 hosts replica 0; GPU 1 hosts replica 0."
    )
    status = {"version": "0.1.0", "uptime_sec": 90061.5, "socket": "/run/gpud/gpud.sock", "proxy": "127.0.0.1:8000",
              "gpus_spec": "auto", "models": 2, "replicas": 3, "ready": 3}
    assert render.format_status(status).splitlines()[1] == "Uptime:   1d 1h"
    venvs = {"venvs": [{"key": "0123456789abcdef", "path": "/v/0123", "packages": ["a==1", "b"],
                        "size_bytes": 3 * 2**20, "last_used": "2024-05-01T10:00:00Z", "models": ["demo"]}]}
    assert render.format_venvs(venvs) == (
        "KEY           PACKAGES  SIZE   LAST USED             MODELS  PATH\n"
        "0123456789ab  a==1 b    3 MiB  2024-05-01T10:00:00Z  demo    /v/0123"
    )
    assert render.format_prune({"removed": []}) == "No unused virtualenvs to remove."


def test_describe_exit_and_failures() -> None:
    assert render.describe_exit(1, None) == "exited with code 1"
    assert render.describe_exit(0, None) == "exited normally (code 0)"
    assert render.describe_exit(127, None) == "command not found (exit code 127)"
    assert render.describe_exit(None, "SIGTERM") == "terminated by SIGTERM"
    assert render.describe_exit(None, "SIGUSR1") == "killed by SIGUSR1"
    assert render.describe_exit(None, None) == "ended with an unknown status"
    assert render.failure_sentence(SHOW) == (
        "Model 'demo' replica 1 failed: killed by SIGKILL (out of memory? stopped by another program?)."
    )
    assert render.failure_sentence({**SHOW, "replicas": REPLICAS[:1]}) is None


def test_replica_changes() -> None:
    before = {0: {"index": 0, "state": "starting", "gpus": [1]}, 2: {"index": 2, "state": "ready", "gpus": [0]}}
    after = {"replicas": [
        {"index": 0, "state": "ready", "gpus": [1], "port": 41234},
        {"index": 1, "state": "pending", "gpus": [0, 1]},
    ]}
    assert render.replica_changes(before, after) == [
        "replica 0: starting → ready (GPU 1, port 41234)",
        "replica 1: pending (GPUs 0,1)",
        "replica 2: removed",
    ]
    backoff = {"index": 0, "state": "backoff", "gpus": [1], "last_exit": {"code": 1, "signal": None}}
    assert render.replica_change(after["replicas"][0], backoff) == "replica 0: ready → backoff (GPU 1, exited with code 1)"
    assert render.replica_change(backoff, backoff) is None


# ---- interruptions -----------------------------------------------------------------------------------


def test_ctrl_c_ends_logs_follow_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def lines(self: Any, path: str, query: Any = None, timeout: Any = None) -> Any:
        assert query == {"replica": 0, "lines": None, "follow": 1} and timeout is None
        yield "one"
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.Client, "stream_lines", lines)
    assert run(capsys, "model", "logs", "demo", "-f") == (0, "one\n", "")


def test_ctrl_c_while_waiting_says_the_operation_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.Client, "request", lambda self, *a, **k: {**SHOW, "busy": True})
    monkeypatch.setattr(commands.Client, "wait_for_model", interrupted)
    assert run(capsys, "model", "restart", "demo") == (
        130, "", "gpud: Stopped waiting; the operation goes on in the background (check with `gpud model show demo`).\n"
    )
