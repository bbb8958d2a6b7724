"""Engine launch builders: exact argv per engine, utilization rounding, and request validation."""

from __future__ import annotations

import shlex
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gpud.engines import (
    ENGINES,
    EngineContext,
    LaunchPlan,
    build_launch,
    gpu_memory_utilization,
    validate_engine_request,
)
from gpud.engines.sim import SIM_FLAGS
from gpud.errors import InvalidInput
from gpud.sim.server import parse_args as sim_server_args

GiB = 1024**3

CTX = EngineContext(
    model="Qwen/Qwen2.5-7B-Instruct",
    name="qwen",
    args=(),
    command=None,
    port=41001,
    host="127.0.0.1",
    vram_bytes=20 * GiB,
    total_bytes=80 * GiB,
    python="/usr/bin/python3",
    bin_dir=None,
)


# --- gpu_memory_utilization ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vram", "total", "expected"),
    [
        (20 * GiB, 80 * GiB, 0.25),
        (30 * GiB, 80 * GiB, 0.375),
        (80 * GiB, 80 * GiB, 1.0),
        (100 * GiB, 80 * GiB, 1.0),  # never above the whole GPU
        (2 * GiB, 3 * GiB, 0.666),  # 0.6667 would round up to 0.667: it must not
        (1 * GiB, 3 * GiB, 0.333),
        (80 * GiB - 1, 80 * GiB, 0.999),  # a hair under the whole GPU is not 1.0
        (-(-80 * GiB // 1000), 80 * GiB, 0.001),  # the smallest share that can be expressed
        (80 * GiB // 1000, 80 * GiB, None),  # under 0.1%: it would be 0.0
    ],
)
def test_utilization_rounds_down(vram: int, total: int, expected: float | None) -> None:
    if expected is None:
        with pytest.raises(InvalidInput, match="too small"):
            gpu_memory_utilization(vram, total)
    else:
        assert gpu_memory_utilization(vram, total) == expected


@given(st.integers(1, 2**40), st.integers(1, 2**40))
@example(333, 1000)
@example(2**40, 2**40 - 1)
def test_utilization_never_exceeds_the_reservation(vram: int, total: int) -> None:
    if vram * 1000 < total:
        with pytest.raises(InvalidInput):
            gpu_memory_utilization(vram, total)
        return
    value = gpu_memory_utilization(vram, total)
    assert 0 < value <= 1.0
    decimal = Fraction(str(value))  # the number written on the engine's command line
    assert decimal * total <= vram
    # As close as three decimals allow: one more thousandth would be over (or over the whole GPU).
    assert decimal == 1 or (decimal + Fraction(1, 1000)) * total > vram


def test_utilization_refuses_nonsense() -> None:
    for vram, total in ((0, GiB), (GiB, 0), (-1, GiB), (1, 80 * GiB)):
        with pytest.raises(InvalidInput):
            gpu_memory_utilization(vram, total)


# --- vllm ----------------------------------------------------------------------------------------


def test_vllm_argv_exact() -> None:
    plan = build_launch("vllm", replace(CTX, vram_bytes=30 * GiB, args=("--max-model-len", "8192")))
    assert plan == LaunchPlan(
        argv=[
            "vllm",
            "serve",
            "Qwen/Qwen2.5-7B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            "41001",
            "--served-model-name",
            "qwen",
            "--gpu-memory-utilization",
            "0.375",
            "--max-model-len",
            "8192",
        ],
        health_path="/health",
        start_timeout_sec=600.0,
    )


def test_vllm_is_found_through_path_which_puts_the_venv_first() -> None:
    plan = build_launch("vllm", replace(CTX, bin_dir="/state/venvs/abc/bin"))
    assert plan.argv[0] == "vllm"
    assert plan.argv[plan.argv.index("--gpu-memory-utilization") + 1] == "0.25"


@pytest.mark.parametrize(
    ("arg", "advice"),
    [
        ("--gpu-memory-utilization", "use --vram instead"),
        ("--gpu-memory-utilization=0.9", "use --vram instead"),
        ("--gpu_memory_utilization=0.9", "use --vram instead"),
        ("--gpu-memory", "use --vram instead"),  # argparse would take the prefix
        ("--port", "--port is set by gpud"),
        ("--port=9000", "--port is set by gpud"),
        ("--host", "--host is set by gpud"),
        ("--host=0.0.0.0", "--host is set by gpud"),
        ("--served-model-name", "use --name instead"),
        ("--served_model_name=x", "use --name instead"),
        ("--model=other", "--model is set by gpud"),
    ],
)
def test_vllm_refuses_managed_flags(arg: str, advice: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_engine_request("vllm", ["--dtype", "auto", arg, "x"], None)
    assert advice in info.value.message


def test_vllm_accepts_its_other_flags() -> None:
    args = [
        "--max-model-len",
        "8192",
        "--model-impl",
        "vllm",
        "--tensor-parallel-size=2",
        "--enforce-eager",
        "--",
    ]
    validate_engine_request("vllm", args, None)


def test_command_template_only_for_command_engine() -> None:
    for engine in ("vllm", "sim"):
        with pytest.raises(InvalidInput, match="--command"):
            validate_engine_request(engine, [], "server --port {port}")


def test_unknown_engine_and_nul_bytes() -> None:
    with pytest.raises(InvalidInput, match="Unknown engine"):
        validate_engine_request("tgi", [], None)
    with pytest.raises(InvalidInput, match="Unknown engine"):
        build_launch("tgi", CTX)
    with pytest.raises(InvalidInput, match="NUL"):
        validate_engine_request("vllm", ["--x\0"], None)
    assert set(ENGINES) == {"vllm", "sim", "command"}


# --- sim -----------------------------------------------------------------------------------------


def test_sim_argv_exact() -> None:
    ctx = replace(CTX, python="/venv/bin/python", args=("--ttft-ms", "5"))
    assert build_launch("sim", ctx) == LaunchPlan(
        argv=[
            "/venv/bin/python",
            "-m",
            "gpud.sim.server",
            "--host",
            "127.0.0.1",
            "--port",
            "41001",
            "--served-model-name",
            "qwen",
            "--ttft-ms",
            "5",
        ],
        health_path="/health",
        start_timeout_sec=30.0,
    )


def test_sim_accepts_its_flags_in_both_forms() -> None:
    args = ["--startup-s", "0", "--ttft-ms=1.5", "--itl-ms", "0.5", "--max-num-seqs=4"]
    validate_engine_request("sim", args, None)
    validate_engine_request("sim", [], None)
    prefix = ["--prefill-ms-per-1k-tokens", "200", "--prefix-cache-tokens=200000"]
    validate_engine_request("sim", prefix, None)
    validate_engine_request("sim", ["--prefill-ms-per-1k-tokens=0.5", "--prefix-cache-tokens", "0"], None)


def test_every_sim_flag_gpud_accepts_is_one_the_sim_server_parses() -> None:
    # Kept in step by hand (the server is not imported on the validation path): say so when they drift.
    parsed = vars(sim_server_args([arg for flag in SIM_FLAGS for arg in (flag, "3")]))
    assert all(parsed[flag[2:].replace("-", "_")] == 3 for flag in SIM_FLAGS)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--ttft"], "'--ttft'"),
        (["--foo=1"], "'--foo=1'"),
        (["5"], "'5'"),
        (["--ttft-ms"], "--ttft-ms needs a value"),
        (["--ttft-ms", "-1"], "--ttft-ms"),
        (["--itl-ms=fast"], "--itl-ms"),
        (["--startup-s", "nan"], "--startup-s"),
        (["--startup-s=inf"], "--startup-s"),
        (["--max-num-seqs", "2.5"], "--max-num-seqs"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--prefix-cache-tokens", "-1"], "--prefix-cache-tokens"),
        (["--prefix-cache-tokens=1e5"], "--prefix-cache-tokens"),
        (["--prefill-ms-per-1k-tokens", "nan"], "--prefill-ms-per-1k-tokens"),
        (["--prefill-ms-per-1k-tokens=-0.5"], "--prefill-ms-per-1k-tokens"),
        (["--prefill-ms-per-1k-tokens"], "--prefill-ms-per-1k-tokens needs a value"),
        (["--port", "1"], "--port is set by gpud"),
        (["--served-model-name=x"], "--served-model-name is set by gpud"),
    ],
)
def test_sim_refuses_bad_args(args: list[str], named: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_engine_request("sim", args, None)
    assert named in info.value.message


# --- command -------------------------------------------------------------------------------------


TEMPLATE = "llama-server -m '/models/{model}.gguf' --alias {name} --host {host} --port {port} -ngl 99"


def test_command_argv_exact() -> None:
    ctx = replace(CTX, command=TEMPLATE, args=("--ctx-size", "4096"))
    plan = build_launch("command", ctx)
    assert plan == LaunchPlan(
        argv=[
            "llama-server",
            "-m",
            "/models/Qwen/Qwen2.5-7B-Instruct.gguf",
            "--alias",
            "qwen",
            "--host",
            "127.0.0.1",
            "--port",
            "41001",
            "-ngl",
            "99",
            "--ctx-size",
            "4096",
        ],
        health_path="/health",
        start_timeout_sec=600.0,
    )


def test_command_memory_placeholders_and_braces() -> None:
    template = "srv --mem-fraction {gpu_memory_utilization} --bytes={vram_bytes} --json '{{\"a\": 1}}'"
    ctx = replace(CTX, command=template, vram_bytes=30 * GiB)
    argv = build_launch("command", ctx).argv
    assert argv == ["srv", "--mem-fraction", "0.375", f"--bytes={30 * GiB}", "--json", '{"a": 1}']


def test_command_health_path_is_configurable() -> None:
    ctx = replace(CTX, command="srv {port}", health_path="/v1/models")
    assert build_launch("command", ctx).health_path == "/v1/models"


@pytest.mark.parametrize(
    "hostile",
    [
        "my model",
        "a'b\"c",
        "$(rm -rf /)",
        "`id`",
        "x; reboot",
        "line1\nline2",
        "{name}",  # substituted text is data, never expanded again
        "{{port}}",
        "*",
        "-rf",
    ],
)
def test_command_keeps_hostile_values_as_one_argument(hostile: str) -> None:
    ctx = replace(CTX, command="srv --model {model} --tag=[{name}]", model=hostile, name=hostile)
    assert build_launch("command", ctx).argv == ["srv", "--model", hostile, f"--tag=[{hostile}]"]


@given(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40))
def test_command_substitution_is_data_for_any_text(value: str) -> None:
    ctx = replace(CTX, command="srv {model} x{name}y", model=value, name=value)
    assert build_launch("command", ctx).argv == ["srv", value, f"x{value}y"]


def test_command_engine_args_are_appended_verbatim() -> None:
    ctx = replace(CTX, command="srv", args=("{model}", "$HOME", "a b"))
    assert build_launch("command", ctx).argv == ["srv", "{model}", "$HOME", "a b"]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "--engine command needs --command TEMPLATE."),
        ("", "--engine command needs --command TEMPLATE."),
        ("   ", "--engine command needs --command TEMPLATE."),
        ("srv --x {foo}", "{foo}"),
        ("srv {model!r}", "{model!r}"),
        ("srv {}", "{}"),
        ("srv 'unclosed", "cannot be split"),
        ("srv {model", "unmatched '{'"),
        ("srv model}", "unmatched '}'"),
        ("srv \0", "NUL"),
    ],
)
def test_command_refuses_bad_templates(template: str | None, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_engine_request("command", [], template)
    assert message in info.value.message


def test_command_validation_matches_shlex() -> None:
    template = "srv --a \"{model} x\" --b '{name}' c\\ d"
    validate_engine_request("command", [], template)
    argv = build_launch("command", replace(CTX, command=template)).argv
    assert len(argv) == len(shlex.split(template))
    assert argv[2] == "Qwen/Qwen2.5-7B-Instruct x"
    assert argv[-1] == "c d"
