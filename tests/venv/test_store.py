"""Per-model virtualenvs (issue #4): the key, real builds against the real package index, the build's
safety (lock, marker, temp dir), prune, and a sim model running from a venv under a real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpud.errors import InvalidInput
from gpud.registry import Model, Registry
from gpud.spec import ModelSpec
from gpud.venv.build import META_FILE, relocate
from gpud.venv.key import (
    Interpreter,
    index_settings,
    normalize_requirement,
    normalize_requirements,
    uv_args,
    venv_key,
)
from gpud.venv.store import VenvBuildFailed, VenvStore
from tests.conftest import Daemon, wait_until

INTERP = Interpreter("/usr/bin/python3", "cpython-3.11.7", ("/site",))
NO_PIP_CONF = {"PIP_CONFIG_FILE": os.devnull}  # keys of the pure tests must not depend on this machine


def key(packages: list[str], env: dict[str, str] | None = None) -> str:
    return venv_key(normalize_requirements(packages), INTERP, index_settings({**NO_PIP_CONF, **(env or {})}))


# ---- the key (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("Six", "six"),
    ("  zope.interface  ", "zope-interface"),
    ("Foo__Bar-.baz>=1.0", "foo-bar-baz>=1.0"),
    ("vllm == 0.6.3", "vllm==0.6.3"),
    ("pkg (>=1, <2)", "pkg<2,>=1"),
    ("pkg<2 ,>=1", "pkg<2,>=1"),
    ("requests[Socks, security]>=2", "requests[security,socks]>=2"),
    ("pkg>=1.0RC1", "pkg>=1.0rc1"),
    ("six ;  python_version  <  '3.12'", "six; python_version < '3.12'"),
    ("Name @ https://example.com/a.whl", "name @ https://example.com/a.whl"),
    ("name@https://example.com/a.whl ; os_name=='posix'", "name @ https://example.com/a.whl ; os_name=='posix'"),
])
def test_requirements_are_normalized(given: str, expected: str) -> None:
    assert normalize_requirement(given) == expected


@pytest.mark.parametrize("bad", ["", "   ", "-i https://evil/simple", "--pre", "./local/dir", "foo[bar", "foo >>1",
                                 "https://example.com/a.whl", "pkg; ", "name @ "])
def test_bad_requirements_are_refused_with_one_sentence(bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        normalize_requirement(bad)
    assert err.value.message.startswith("Invalid venv package")


def test_key_ignores_order_case_spelling_duplicates_and_whitespace() -> None:
    base = key(["vllm==0.6.3", "six", "zope.interface"])
    assert key([" Zope_Interface", "SIX", "vllm == 0.6.3", "six"]) == base
    assert key(["six", "vllm==0.6.4", "zope.interface"]) != base
    assert key(["six"]) != key(["six", "zope.interface"])


def test_key_changes_with_index_settings_and_interpreter() -> None:
    base = key(["six"])
    changed = {
        key(["six"], {"PIP_INDEX_URL": "https://mirror.example/simple"}),
        key(["six"], {"PIP_EXTRA_INDEX_URL": "https://extra.example/simple"}),
        key(["six"], {"UV_INDEX_URL": "https://mirror.example/simple"}),
        key(["six"], {"UV_EXTRA_INDEX_URL": "https://extra.example/simple"}),
        key(["six"], {"PIP_FIND_LINKS": "/opt/wheels"}),
    }
    assert base not in changed and len(changed) == 5
    assert key(["six"], {"HOME_IS_IRRELEVANT": "1", "HTTPS_PROXY": "http://p:3128"}) == base
    other = Interpreter("/usr/bin/python3", "cpython-3.12.1", ("/site",))
    assert venv_key(("six",), other, index_settings(NO_PIP_CONF)) != key(["six"])


def test_config_env_and_pip_conf_count_as_index_settings(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://conf.example/simple\nfind-links = /a /b\n")
    environ = {"PIP_CONFIG_FILE": str(conf), "XDG_CONFIG_DIRS": str(tmp_path / "none"), "HOME": str(tmp_path)}
    settings = index_settings(environ)["pip"]
    assert settings["index-url"] == "https://conf.example/simple" and settings["find-links"] == ["/a", "/b"]
    plain = VenvStore(tmp_path / "v", environ=NO_PIP_CONF, installer="pip", interpreter=INTERP)
    configured = VenvStore(tmp_path / "v", environ=NO_PIP_CONF, config_env={"PIP_INDEX_URL": "https://c/simple"},
                           installer="pip", interpreter=INTERP)
    assert plain.key_for(["six"])[0] != configured.key_for(["six"])[0]


def test_pip_settings_reach_uv_as_flags_unless_uv_has_its_own() -> None:
    env = {**NO_PIP_CONF, "PIP_INDEX_URL": "https://i/simple", "PIP_EXTRA_INDEX_URL": "https://e1 https://e2",
           "PIP_FIND_LINKS": "/w", "PIP_CONSTRAINT": "/c.txt"}
    assert uv_args(env) == ["--index-url", "https://i/simple", "--extra-index-url", "https://e1",
                            "--extra-index-url", "https://e2", "--find-links", "/w",
                            "--index-strategy", "unsafe-best-match", "--constraint", "/c.txt"]
    assert uv_args({**env, "UV_INDEX_URL": "https://uv/simple", "UV_CONSTRAINT": "/u.txt"}) == []


def test_relocate_rewrites_scripts_but_not_binaries(tmp_path: Path) -> None:
    tmp, final = tmp_path / ".tmp-k-1", tmp_path / "k"
    (tmp / "bin").mkdir(parents=True)
    (tmp / "bin" / "tool").write_text(f"#!{tmp}/bin/python\nprint(1)\n")
    (tmp / "bin" / "tool").chmod(0o755)
    (tmp / "bin" / "activate").write_text(f"VIRTUAL_ENV='{tmp}'\n")
    (tmp / "bin" / "native").write_bytes(b"\x7fELF" + str(tmp).encode())
    (tmp / "pyvenv.cfg").write_text(f"command = virtualenv {tmp}\n")
    relocate(tmp, final)
    assert (tmp / "bin" / "tool").read_text() == f"#!{final}/bin/python\nprint(1)\n"
    assert os.access(tmp / "bin" / "tool", os.X_OK)
    assert (tmp / "bin" / "activate").read_text() == f"VIRTUAL_ENV='{final}'\n"
    assert (tmp / "bin" / "native").read_bytes() == b"\x7fELF" + str(tmp).encode()
    assert str(final) in (tmp / "pyvenv.cfg").read_text()


def test_replicas_get_the_venv_first_on_their_path(tmp_path: Path) -> None:
    store = VenvStore(tmp_path / "v", environ=NO_PIP_CONF, config_env={"PATH": "/cfg/bin"}, installer="pip",
                      interpreter=INTERP)
    spec = {"model": "m", "engine": "command", "command": "serve --port {port}", "venv": {"packages": ["six"]}}
    model = Model(ModelSpec.from_json(spec))
    with pytest.raises(VenvBuildFailed, match="not built"):  # packages asked for, venv missing: never run bare
        store.python_for(model)
    model.venv = {"path": "/state/venvs/k", "packages": ["six"], "key": "k"}
    assert store.python_for(model) == ("/state/venvs/k/bin/python", "/state/venvs/k/bin")
    assert store.extra_env_for(model) == {"VIRTUAL_ENV": "/state/venvs/k", "PATH": "/state/venvs/k/bin:/cfg/bin"}
    model.spec = ModelSpec.from_json({**spec, "env": {"PATH": "/mine"}})
    assert store.extra_env_for(model)["PATH"] == "/state/venvs/k/bin:/mine"
    model.spec = ModelSpec.from_json({**spec, "unset_env": ["PATH"]})
    assert store.extra_env_for(model)["PATH"] == "/state/venvs/k/bin"
    bare = Model(ModelSpec.from_json({"model": "b", "engine": "sim"}))
    assert store.python_for(bare)[1] is None and store.extra_env_for(bare) == {}


# ---- real builds ---------------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def entries(root: Path) -> list[str]:
    """What lies under a venv root besides the lock files and the base venv every build copies."""
    if not root.exists():
        return []
    return sorted(e for e in os.listdir(root) if not e.endswith(".lock") and not e.startswith(".base"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[VenvStore, Any, list[str]]:
    """One venv with six, built once for the tests of this module that only read it."""
    store = VenvStore(tmp_path_factory.mktemp("venvs"))
    lines: list[str] = []
    info = run(store.resolve(["six"], lines.append))
    return store, info, lines


def test_build_installs_and_layers_the_daemon_beneath(built: tuple[VenvStore, Any, list[str]]) -> None:
    store, info, lines = built
    assert info.built and info.path == store.root / info.key
    assert (info.path / META_FILE).is_file() and entries(store.root) == [info.key]
    assert any("six" in line for line in lines)  # the installer's output came through as progress
    probe = ("import json, sys, six, gpud, aiohttp; "
             "print(json.dumps([sys.prefix, six.__file__, gpud.__file__, aiohttp.__file__, sys.path]))")
    out = subprocess.run([info.python, "-c", probe], capture_output=True, text=True, check=True, timeout=30,
                         cwd=store.root)  # not the checkout: gpud must come from the layer
    prefix, six_file, gpud_file, aiohttp_file, path = json.loads(out.stdout)
    assert prefix == str(info.path) and six_file.startswith(str(info.path))
    assert not aiohttp_file.startswith(str(info.path)) and gpud_file.endswith("gpud/__init__.py")
    own = next(i for i, p in enumerate(path) if p.startswith(str(info.path)))
    beneath = next(i for i, p in enumerate(path) if p and aiohttp_file.startswith(p + "/"))
    assert own < beneath  # the venv's own versions win


def test_second_resolve_is_a_cache_hit(built: tuple[VenvStore, Any, list[str]]) -> None:
    store, info, _ = built
    marker = (info.path / META_FILE).stat()
    again = run(store.resolve([" SIX "]))
    assert not again.built and again.path == info.path
    assert (info.path / META_FILE).stat().st_mtime_ns == marker.st_mtime_ns
    assert (info.path / META_FILE).stat().st_ino == marker.st_ino


def test_failed_build_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    store = VenvStore(tmp_path / "venvs")
    with pytest.raises(VenvBuildFailed) as err:
        run(store.resolve(["gpud-test-no-such-package-4f1c"]))
    message = err.value.message
    assert message.startswith("Could not build the virtualenv for gpud-test-no-such-package-4f1c")
    assert "gpud-test-no-such-package-4f1c" in message.split("last lines:")[1]  # the installer's words
    assert entries(tmp_path / "venvs") == []


def test_concurrent_resolves_build_once(tmp_path: Path) -> None:
    # Three stores: each has its own in-process lock, so only the file lock can keep them from building twice.
    stores = [VenvStore(tmp_path / "venvs") for _ in range(3)]

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(s.resolve(["six"]) for s in stores))

    infos = run(all_at_once())
    assert sorted(i.built for i in infos) == [False, False, True]
    assert len({i.path for i in infos}) == 1 and entries(tmp_path / "venvs") == [infos[0].key]


class StallingProxy:
    """An HTTP proxy that accepts connections and never answers: the installer hangs mid-build."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connected = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.connected.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.server.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def stalling_proxy() -> Iterator[StallingProxy]:
    proxy = StallingProxy()
    yield proxy
    proxy.close()


def builder_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "gpud.venv.build" in " ".join(p.cmdline())]


def processes_naming(text: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def test_sigkilled_build_leaves_no_half_env_and_prune_leaves_it_alone(
        tmp_path: Path, stalling_proxy: StallingProxy) -> None:
    root = tmp_path / "venvs"
    quiet = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    proxy = f"http://127.0.0.1:{stalling_proxy.port}"
    # Proxy and cache settings do not change what gets installed, so the key stays the same.
    stalled = VenvStore(root, environ={**quiet, "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "UV_NO_CACHE": "1"})
    normal = VenvStore(root, environ=quiet)
    assert stalled.key_for(["six"]) == normal.key_for(["six"])
    key = normal.key_for(["six"])[0]

    async def scenario() -> tuple[BaseException | None, list[str], list[str]]:
        task = asyncio.ensure_future(stalled.resolve(["six"]))
        connected = await asyncio.to_thread(stalling_proxy.connected.wait, 30)
        assert connected, "the installer never reached the index"
        pruned = await normal.prune(Registry())  # being built: not touched
        during = entries(root)
        pids = builder_pids()
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - the failure is what this test checks
            return exc, pruned, during
        return None, pruned, during

    exc, pruned, during = run(scenario())
    assert pruned == [] and len(during) == 1 and during[0].startswith(f".tmp-{key}-")
    assert isinstance(exc, VenvBuildFailed) and "SIGKILL" in exc.message
    assert not (root / key).exists() and normal.list_json(Registry()) == []
    # The orphaned installer dies with its builder (parent-death signal) and does not write on.
    wait_until(lambda: not processes_naming(during[0]), 10, "the orphaned installer to go")
    info = run(normal.resolve(["six"]))
    assert info.built and entries(root) == [key]  # the leftover temp dir was cleaned


def test_cancelled_resolve_stops_the_builder_and_cleans_up(tmp_path: Path, stalling_proxy: StallingProxy) -> None:
    root = tmp_path / "venvs"
    proxy = f"http://127.0.0.1:{stalling_proxy.port}"
    environ = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    store = VenvStore(root, environ={**environ, "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "UV_NO_CACHE": "1"})

    async def scenario() -> None:
        task = asyncio.ensure_future(store.resolve(["six"]))
        assert await asyncio.to_thread(stalling_proxy.connected.wait, 30), "the installer never reached the index"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert builder_pids() == [] and entries(root) == []  # SIGTERM: the builder removed its temp dir


def test_pip_builds_when_uv_is_missing(tmp_path: Path) -> None:
    store = VenvStore(tmp_path / "venvs", installer="pip")
    info = run(store.resolve(["six", "idna"]))  # idna is installed beneath too (aiohttp needs it)
    assert info.built and store.uv is None
    probe = "import idna, six; print(idna.__file__)"
    out = subprocess.run([info.python, "-c", probe], check=True, timeout=30, capture_output=True, text=True)
    assert out.stdout.startswith(str(info.path))  # pip installed its own: the layer was not there to fool it
    script = (info.path / "bin" / "pip").read_text()
    assert f"{info.path}/bin/python" in script and ".tmp-" not in script  # relocated


def test_prune_removes_only_unused_venvs(tmp_path: Path) -> None:
    store = VenvStore(tmp_path / "venvs")
    info = run(store.resolve(["six"]))
    registry = Registry()
    model = Model(ModelSpec.from_json({"model": "m", "engine": "sim", "venv": {"packages": ["six"]}}))
    model.venv = {"path": str(info.path), "packages": ["six"], "key": info.key}
    registry.models["m"] = model
    [listed] = store.list_json(registry)
    assert listed["key"] == info.key and listed["models"] == ["m"] and listed["packages"] == ["six"]
    assert listed["size_bytes"] > 0 and listed["last_used"] > 0 and listed["path"] == str(info.path)
    assert run(store.prune(registry)) == [] and info.path.is_dir()
    del registry.models["m"]
    assert run(store.prune(registry)) == [str(info.path)]
    assert not info.path.exists() and entries(tmp_path / "venvs") == []


# ---- a real daemon -------------------------------------------------------------------------------------


def test_sim_model_runs_from_its_venv(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon().start()
    events = daemon.client.stream_lines("/v1/events", {"model": "venv-sim"}, timeout=45)
    next(events)  # the current state ("removed"): from here on we are subscribed
    daemon.start_model({"model": "venv-sim", "engine": "sim", "vram": "1GiB", "venv": {"packages": ["six"]}},
                       settle=False)
    progress = []
    try:
        for line in events:
            event = json.loads(line)
            if event["type"] == "progress":
                progress.append(event)
            elif event["type"] == "model" and not event["model"]["busy"]:
                break
    finally:
        events.close()
    assert progress and all(e["name"] == "venv-sim" and e["phase"] == "venv" for e in progress)
    assert any("six" in e["line"] for e in progress)
    shown = daemon.show("venv-sim")
    assert shown["state"] == "running", shown
    venv = Path(shown["venv"]["path"])
    assert shown["venv"]["packages"] == ["six"] and venv.parent == daemon.state_dir / "venvs"
    proc = psutil.Process(shown["replicas"][0]["pid"])
    assert proc.cmdline()[0] == str(venv / "bin" / "python")
    env = proc.environ()
    assert env["VIRTUAL_ENV"] == str(venv) and env["PATH"].startswith(f"{venv}/bin:")
    subprocess.run([str(venv / "bin" / "python"), "-c", "import six"], check=True, timeout=30)

    listed = json.loads(daemon.cli("venv", "list", "-o", "json").stdout)["venvs"]
    assert [(v["path"], v["models"]) for v in listed] == [(str(venv), ["venv-sim"])]
    table = daemon.cli("venv", "list")
    assert table.returncode == 0 and "venv-sim" in table.stdout and "six" in table.stdout
    kept = daemon.cli("venv", "prune", "-o", "json")
    assert json.loads(kept.stdout)["removed"] == [] and venv.is_dir()

    assert daemon.cli("model", "stop", "venv-sim").returncode == 0
    daemon.wait_removed("venv-sim")
    pruned = daemon.cli("venv", "prune")
    assert pruned.returncode == 0 and str(venv) in pruned.stdout and not venv.exists()


def test_failed_build_fails_the_model_and_reserves_nothing(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon().start()
    daemon.start_model({"model": "bad-venv", "engine": "sim", "vram": "1GiB",
                        "venv": {"packages": ["gpud-test-no-such-package-4f1c"]}}, settle=False)
    shown = daemon.wait_idle("bad-venv", timeout=45)
    assert shown["state"] == "failed" and shown["venv"] is None
    message = shown["replicas"][0]["message"]
    assert "Could not build the virtualenv" in message and "gpud-test-no-such-package-4f1c" in message
    gpus = daemon.client.request("GET", "/v1/gpus")["gpus"]
    assert all(g["reserved_bytes"] == 0 for g in gpus)
    assert entries(daemon.state_dir / "venvs") == []
