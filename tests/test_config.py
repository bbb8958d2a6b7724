"""Settings: defaults < file < env < flags; unknown keys and wrong types name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.config import default_socket_path, load_settings
from gpud.errors import InvalidInput

NO_FLAGS: dict[str, object] = {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpud.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings({"config": None}, {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert (s.gpus, s.proxy.listen, s.multi_replica, s.headroom_bytes) == ("auto", "127.0.0.1:8000", True, 512 * 2**20)
    assert s.supervisor.restart == "on-failure" and s.supervisor.start_limit_burst == 5
    assert s.config_path is None and s.proxy.api_keys == ()


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[gpus]\nspec = "sim:1x8GiB"\nheadroom = "1GiB"\n[proxy]\nlisten = "0.0.0.0:9000"\n'
                           '[daemon]\nsocket = "/file.sock"\n[allocator]\nsingle_gpu_multi_replica = false\n')
    env = {"GPUD_CONFIG": str(path), "HOME": str(tmp_path)}
    s = load_settings(NO_FLAGS, env)
    assert (s.gpus, s.proxy.listen, s.socket, s.headroom_bytes, s.multi_replica) == (
        "sim:1x8GiB", "0.0.0.0:9000", "/file.sock", 2**30, False)
    env.update(GPUD_GPUS="sim:2x8GiB", GPUD_LISTEN="127.0.0.1:1", GPUD_SOCKET="/env.sock",
               GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA="1")
    s = load_settings(NO_FLAGS, env)
    assert (s.gpus, s.proxy.listen, s.socket, s.multi_replica) == ("sim:2x8GiB", "127.0.0.1:1", "/env.sock", True)
    s = load_settings({"gpus": "sim:3x8GiB", "listen": "127.0.0.1:2", "socket": "/flag.sock"}, env)
    assert (s.gpus, s.proxy.listen, s.socket) == ("sim:3x8GiB", "127.0.0.1:2", "/flag.sock")


def test_sections_env_models_supervisor_api_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[env]\nHF_HOME = "/models"\n[supervisor]\nrestart = "always"\nstop_timeout_sec = 3\n'
                           '[proxy]\napi_keys = ["k1"]\nmax_body = "1MiB"\n'
                           '[models.demo]\nmodel = "m"\nengine = "sim"\n')
    s = load_settings({"config": str(path)}, {"HOME": str(tmp_path), "GPUD_API_KEY": "k0"})
    assert s.env == {"HF_HOME": "/models"}
    assert s.supervisor.restart == "always" and s.supervisor.stop_timeout_sec == 3
    assert s.proxy.api_keys == ("k0", "k1") and s.proxy.max_body_bytes == 2**20
    assert (s.proxy.idle_timeout_sec, s.proxy.client_timeout_sec, s.proxy.max_connections) == (300, 60, 0)
    assert s.models == {"demo": {"model": "m", "engine": "sim"}}
    path.write_text('[proxy]\nidle_timeout_sec = 2.5\nclient_timeout_sec = 10\nmax_connections = 100\n')
    s = load_settings({"config": str(path)}, {"HOME": str(tmp_path)})
    assert (s.proxy.idle_timeout_sec, s.proxy.client_timeout_sec, s.proxy.max_connections) == (2.5, 10, 100)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[daemon]\nsockett = 1\n", "'daemon.sockett'"),
        ("[nope]\n", "section 'nope'"),
        ("[gpus]\nspec = 3\n", "'gpus.spec'"),
        ("[allocator]\nsingle_gpu_multi_replica = 1\n", "'allocator.single_gpu_multi_replica'"),
        ("[supervisor]\nstart_limit_burst = 1.5\n", "'supervisor.start_limit_burst'"),
        ("[supervisor]\nrestart = \"sometimes\"\n", "'supervisor.restart'"),
        ("[supervisor]\nrestart_sec = -1\n", "'supervisor.restart_sec'"),
        ("[proxy]\nlisten = \"nowhere\"\n", "listen"),
        ("[proxy]\napi_keys = [1]\n", "'proxy.api_keys'"),
        ("[proxy]\nidle_timeout_sec = 0\n", "'proxy.idle_timeout_sec'"),
        ("[proxy]\nclient_timeout_sec = inf\n", "'proxy.client_timeout_sec'"),
        ("[proxy]\nclient_timeout_sec = \"1m\"\n", "'proxy.client_timeout_sec'"),
        ("[proxy]\nmax_connections = -1\n", "'proxy.max_connections'"),
        ("[proxy]\nmax_connections = 1.5\n", "'proxy.max_connections'"),
        ("[gpus]\nheadroom = \"lots\"\n", "gpus.headroom"),
        ("[env]\nCUDA_VISIBLE_DEVICES = \"0\"\n", "CUDA_VISIBLE_DEVICES"),
        ("[models.\"../x\"]\nmodel = \"m\"\n", "../x"),
        ("gpus = 1\n", "'gpus'"),
        ("[daemon\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as err:
        load_settings({"config": str(path)}, {"HOME": str(tmp_path)})
    assert words in err.value.message
    if "listen" not in words:
        assert str(path) in err.value.message


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_settings({"config": str(tmp_path / "absent.toml")}, {"HOME": str(tmp_path)})


def test_bad_multi_replica_env(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA"):
        load_settings(NO_FLAGS, {"HOME": str(tmp_path), "GPUD_ENABLE_SINGLE_GPU_MULTI_REPLICA": "maybe"})


def test_default_socket_path_honours_env() -> None:
    assert default_socket_path({"GPUD_SOCKET": "/x.sock"}) == "/x.sock"


def test_demand_settings(tmp_path: Path) -> None:
    """SPEC §12: [scale] windows, proxy.wake_timeout_sec and proxy.wake_queue, with their defaults."""
    s = load_settings({"config": None}, {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert (s.scale.up_after_sec, s.scale.down_after_sec) == (5.0, 60.0)
    assert (s.proxy.wake_timeout_sec, s.proxy.wake_queue) == (600.0, 1024)
    path = write(tmp_path, "[scale]\nup_after_sec = 2\ndown_after_sec = 0.5\n[proxy]\nwake_timeout_sec = 30\n"
                           "wake_queue = 8\n")
    s = load_settings({"config": str(path)}, {})
    assert (s.scale.up_after_sec, s.scale.down_after_sec, s.proxy.wake_timeout_sec, s.proxy.wake_queue) == (
        2.0, 0.5, 30.0, 8)
    for text, words in [("[scale]\nup_after_sec = 0\n", "scale.up_after_sec"),
                        ("[scale]\nsideways = 1\n", "scale.sideways"),
                        ("[proxy]\nwake_timeout_sec = -1\n", "proxy.wake_timeout_sec"),
                        ("[proxy]\nwake_queue = 0\n", "proxy.wake_queue")]:
        with pytest.raises(InvalidInput, match=words):
            load_settings({"config": str(write(tmp_path, text))}, {})
