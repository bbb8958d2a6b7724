"""packaging/: the default config documents the real defaults, and build-deb.sh makes a .deb whose gpud runs.

The .deb is built once per session run of this file (about 20 s: a venv, pip installing gpud's
dependencies, bytecode) and unpacked with `dpkg-deb -x` into a temporary directory. Its /usr/bin/gpud
finds the venv relative to itself, so the unpacked copy runs as the installed one would, from
TMP/usr/bin/gpud and TMP/opt/gpud; nothing is installed on this machine.

The build needs pip to reach a package index (or GPUD_TEST_WHEELHOUSE=DIR of wheels, passed as
--wheelhouse); it is skipped when dpkg-deb is missing or the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from gpud import __version__
from gpud.config import Settings, load_settings
from gpud.daemon import instance_id
from gpud.supervise import procs
from gpud.supervise.supervisor import INSTANCE_ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "packaging" / "gpud.toml"
BUILD = ROOT / "packaging" / "build-deb.sh"
NETWORK_ERRORS = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                            r"Network is unreachable|ConnectTimeout|Name or service not known")


# ---- the default config file (no dpkg needed) ---------------------------------------------------------------

def test_every_commented_setting_in_the_default_config_is_the_real_default(tmp_path: Path) -> None:
    text = CONFIG.read_text()
    # "#key = value" lines are the defaults; removing the "#" must change nothing.
    uncommented = re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text)
    assert uncommented != text
    flags = {"socket": "/run/gpud/gpud.sock", "state_dir": "/var/lib/gpud"}

    def settings(body: str) -> Settings:
        path = tmp_path / "gpud.toml"
        path.write_text(body)
        return load_settings({"config": str(path)}, environ={})

    shipped, everything = settings(text), settings(uncommented)
    defaults = settings("")
    assert shipped.socket_group == everything.socket_group == "gpud"
    assert (everything.socket, str(everything.state_dir)) == (flags["socket"], flags["state_dir"])
    for name in Settings.__dataclass_fields__:
        if name not in ("config_path", "socket", "state_dir", "socket_group"):
            assert getattr(everything, name) == getattr(defaults, name) == getattr(shipped, name), name


def test_the_default_config_has_every_section() -> None:
    headers = re.findall(r"(?m)^\[([a-z]+)\]$", CONFIG.read_text())
    assert headers == ["daemon", "gpus", "allocator", "proxy", "supervisor", "estimate", "env"]
    assert "[models." in CONFIG.read_text()  # an example of a declarative model


def test_build_script_is_valid_bash_and_documents_itself() -> None:
    subprocess.run(["bash", "-n", str(BUILD)], check=True)
    assert os.access(BUILD, os.X_OK)
    done = subprocess.run([str(BUILD), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--wheelhouse" in done.stdout


# ---- the .deb ---------------------------------------------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                reason="dpkg-deb is not installed (it is part of Debian's dpkg package)")


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="gpud-deb-test-"))
    try:
        cmd = [str(BUILD), "-o", str(out)]
        if os.environ.get("GPUD_TEST_WHEELHOUSE"):
            cmd += ["--wheelhouse", os.environ["GPUD_TEST_WHEELHOUSE"]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 and NETWORK_ERRORS.search(done.stderr + done.stdout):
            pytest.skip("build-deb.sh could not reach the package index for gpud's dependencies "
                        "(set GPUD_TEST_WHEELHOUSE to a directory of wheels to build offline)")
        assert done.returncode == 0, f"build-deb.sh failed:\n{done.stdout}\n{done.stderr}"
        debs = list(out.glob("gpud_*.deb"))
        assert len(debs) == 1 and done.stdout.strip().endswith(debs[0].name)
        yield debs[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def unpacked(deb: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gpud-x-"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(root / "DEBIAN")], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


@needs_dpkg
@pytest.mark.timeout(600)
def test_the_package_holds_the_venv_the_command_the_unit_and_a_conffile(deb: Path, unpacked: Path) -> None:
    assert field(deb, "Package") == "gpud" and field(deb, "Version") == __version__
    assert deb.name == f"gpud_{__version__}_{field(deb, 'Architecture')}.deb"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "root/root" in listing and " gpud/gpud " not in listing  # files belong to root, not the builder
    assert (unpacked / "DEBIAN" / "conffiles").read_text().split() == ["/etc/gpud/gpud.toml"]
    for installed, source in [
        ("lib/systemd/system/gpud.service", "contrib/systemd/gpud.service"),
        ("usr/lib/sysusers.d/gpud.conf", "contrib/systemd/gpud.sysusers"),
        ("etc/gpud/gpud.toml", "packaging/gpud.toml"),
    ]:
        assert (unpacked / installed).read_bytes() == (ROOT / source).read_bytes(), installed
    assert os.access(unpacked / "usr/bin/gpud", os.X_OK)
    for script in ("postinst", "prerm", "postrm"):
        path = unpacked / "DEBIAN" / script
        assert os.access(path, os.X_OK)
        subprocess.run(["sh", "-n", str(path)], check=True)
    # Relocated: nothing in the venv still names the build's staging directory.
    cfg = (unpacked / "opt/gpud/pyvenv.cfg").read_text()
    assert "/opt/gpud" in cfg and "gpud-deb." not in cfg
    assert (unpacked / "opt/gpud/bin/pip").read_text().startswith("#!/opt/gpud/bin/python")
    # Bytecode is shipped (/opt is read-only for the service) and names the installed paths.
    pycs = list((unpacked / "opt/gpud/lib").glob("python3*/site-packages/gpud/cli/__pycache__/main.*.pyc"))
    assert pycs and b"/opt/gpud/lib/" in pycs[0].read_bytes() and b"gpud-deb." not in pycs[0].read_bytes()
    # `gpud ui` serves its page from the package: the static files must be in it.
    static = list((unpacked / "opt/gpud/lib").glob("python3*/site-packages/gpud/ui/static"))
    assert static and {"index.html", "app.js", "app.css"} <= {p.name for p in static[0].iterdir()}


@needs_dpkg
@pytest.mark.timeout(600)
def test_the_unpacked_gpud_runs_from_its_own_venv(unpacked: Path, tmp_path: Path) -> None:
    gpud = str(unpacked / "usr/bin/gpud")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GPUD_"))}
    done = subprocess.run([gpud, "--version"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"gpud {__version__}", done.stderr
    done = subprocess.run([gpud, "plan", "--gpus", "sim:1x8GiB", "--vram", "1GiB", "-o", "json"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True
    # The packaged interpreter is the venv's, not this test's.
    done = subprocess.run([str(unpacked / "opt/gpud/bin/python"), "-c", "import gpud, sys; print(gpud.__file__)"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.stdout.startswith(str(unpacked / "opt/gpud/lib/")), done.stdout + done.stderr


@needs_dpkg
@pytest.mark.timeout(600)
def test_the_unpacked_daemon_runs_a_replica_and_stops_cleanly(unpacked: Path, short_tmp: Path) -> None:
    """The whole daemon from the package: aiohttp, uvloop, the launch shim and the sim engine in its venv."""
    gpud = str(unpacked / "usr/bin/gpud")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GPUD_"))}
    socket, state = str(short_tmp / "gpud.sock"), short_tmp / "state"
    (short_tmp / "gpud.toml").write_text("")
    log = open(short_tmp / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    daemon = subprocess.Popen(
        [gpud, "daemon", "--config", str(short_tmp / "gpud.toml"), "--socket", socket, "--state-dir", str(state),
         "--gpus", "sim:1x8GiB", "--listen", f"127.0.0.1:{free_port(set())}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([gpud, "--socket", socket, *args], capture_output=True, text=True, timeout=60, env=env)

        wait_until(lambda: daemon.poll() is None and cli("status").returncode == 0, 30, "the packaged daemon")
        done = cli("model", "start", "demo", "--engine", "sim", "--vram", "1GiB", "-o", "json", "--",
                   "--startup-s", "0")
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["replicas_ready"] == 1
        # The sim engine runs on the daemon's interpreter: the package's venv, by its unresolved path.
        argv = Path(f"/proc/{shown['replicas'][0]['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[0].decode() == str(unpacked / "opt/gpud/bin/python")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, (short_tmp / "daemon.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    left = procs.find_orphans(INSTANCE_ENV, instance_id(state))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"replica processes outlived the packaged daemon: {left}"
