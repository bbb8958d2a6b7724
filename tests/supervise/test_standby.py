"""The standby parent shim (gpud.supervise.standby): a replica start hands its order to a shim already started,
the engine gets the replica's environment and nothing of the standby's, and no standby outlives its daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from helpers import wait_until

from gpud.supervise.procs import alive
from gpud.supervise.standby import ShimStarter

REPO = Path(__file__).resolve().parents[2]
ENGINE = "import os; print('FOO=%s MARK=%s' % (os.environ.get('FOO'), os.environ.get('ONLY_STANDBY')))"


def shim_args(log: Path) -> list[str]:
    return ["--log", str(log), "--stop-timeout", "1", "--parent-pid", str(os.getpid()), "--",
            sys.executable, "-c", ENGINE]


async def events(proc: asyncio.subprocess.Process) -> list[dict[str, object]]:
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), timeout=30)
    await proc.wait()
    return [json.loads(line) for line in out.decode().splitlines()]


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """wait_until for the event loop: the standby is started by a task of this loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_start_uses_the_standby_and_gives_the_engine_the_replica_env(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def main() -> None:
        starter = ShimStarter(tmp_path, {**env, "ONLY_STANDBY": "1"})
        first = await starter.start(shim_args(tmp_path / "first.log"), {**env, "FOO": "first"})
        assert [e["event"] for e in await events(first)] == ["spawned", "exited"]
        await until(lambda: starter._standby is not None, "a standby to be started after the first start")
        standby = starter._standby
        assert standby is not None and standby.pid != first.pid
        second = await starter.start(shim_args(tmp_path / "second.log"), {**env, "FOO": "second"})
        assert second.pid == standby.pid, "the second start did not use the standby"
        got = await events(second)
        assert got[-1] == {"event": "exited", "code": 0, "signal": None}
        assert "FOO=second MARK=None" in (tmp_path / "second.log").read_text()
        assert "FOO=first MARK=None" in (tmp_path / "first.log").read_text()
        await until(lambda: starter._standby is not None, "the next standby")
        refilled = starter._standby
        assert refilled is not None
        await starter.close()
        assert refilled.returncode == 0, "a standby whose stdin closes exits quietly"
        assert alive([refilled.pid]) == []

    asyncio.run(main())


def test_a_dead_standby_is_replaced_by_an_ordinary_start(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def main() -> None:
        starter = ShimStarter(tmp_path, env)
        starter.warm()
        await until(lambda: starter._standby is not None, "the standby")
        standby = starter._standby
        assert standby is not None
        standby.kill()
        await standby.wait()
        proc = await starter.start(shim_args(tmp_path / "r.log"), {**env, "FOO": "x"})
        assert proc.pid != standby.pid
        assert (await events(proc))[-1] == {"event": "exited", "code": 0, "signal": None}
        assert "FOO=x" in (tmp_path / "r.log").read_text()
        await starter.close()

    asyncio.run(main())


# A stand-in for the daemon: keeps a standby, writes its pid, then idles until the test SIGKILLs it.
DAEMON = textwrap.dedent(r'''
    import asyncio, os, sys
    from pathlib import Path
    from gpud.supervise.standby import ShimStarter

    async def main():
        starter = ShimStarter(Path(sys.argv[1]), dict(os.environ))
        starter.warm()
        while starter._standby is None:
            await asyncio.sleep(0.02)
        Path(sys.argv[1], "standby.tmp").write_text(str(starter._standby.pid))
        os.replace(Path(sys.argv[1], "standby.tmp"), Path(sys.argv[1], "standby"))
        await asyncio.Event().wait()

    asyncio.run(main())
''')


def test_a_standby_dies_with_its_daemon(tmp_path: Path) -> None:
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    daemon = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pid_file = tmp_path / "standby"
        wait_until(pid_file.exists, 30, "the stand-in daemon's standby")
        standby = int(pid_file.read_text())
        assert alive([standby]) == [standby]
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        wait_until(lambda: alive([standby]) == [], 10, "the standby to exit after its daemon's SIGKILL")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_a_standby_closed_without_an_order_exits_0_and_says_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpud.supervise.shim", "--standby"], input=b"",
                          capture_output=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
