"""The real shim (python -m gpud.supervise.shim) with small Python engines: events, exit codes, logs, and
above all that no process of a replica's tree survives the shim or a SIGKILLed daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from gpud.supervise.logs import tail
from gpud.supervise.procs import alive

REPO = Path(__file__).resolve().parents[2]

# One engine program; its arguments are steps run in order (see the test names for what they build).
ENGINE = r'''
import os, signal, subprocess, sys, time
pids = sys.argv[1]

def record(name):
    tmp = os.path.join(pids, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pids, name))

def wait_file(name):
    while not os.path.exists(os.path.join(pids, name)):
        time.sleep(0.01)

for step in sys.argv[2:]:
    op, _, arg = step.partition(":")
    if op == "record":
        record(arg)
    elif op == "print":
        print("hello on stdout", flush=True)
        print("hello on stderr", file=sys.stderr, flush=True)
    elif op == "spam":
        for i in range(int(arg)):
            sys.stdout.write(f"line {i:05d} " + "x" * 88 + "\n")
        sys.stdout.flush()
    elif op == "exit":
        sys.exit(int(arg))
    elif op == "signal":
        os.kill(os.getpid(), getattr(signal, arg))
    elif op == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif op == "trap-term":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    elif op == "stubborn":  # a grandchild that ignores SIGTERM
        subprocess.Popen([sys.executable, __file__, pids, "ignore-term", "record:stubborn", "sleep"])
        wait_file("stubborn")
    elif op == "escape":  # a grandchild that double-forks and leaves the session and process group
        sys.stdout.flush()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                record("escaped")
                while True:
                    time.sleep(60)
            os._exit(0)
        os.waitpid(middle, 0)
        wait_file("escaped")
    elif op == "sleep":
        while True:
            time.sleep(60)
'''

# A stand-in for the daemon: spawns the shim as gpud does, then idles until the test kills it.
DAEMON = r'''
import os, subprocess, sys, time
pids, log, mode = sys.argv[1], sys.argv[2], sys.argv[3]
shim = subprocess.Popen(
    [sys.executable, "-m", "gpud.supervise.shim", "--log", log, "--stop-timeout", "1",
     "--parent-pid", str(os.getpid()), "--", *sys.argv[4:]],
    start_new_session=True, stdout=subprocess.PIPE)
with open(os.path.join(pids, "shim.tmp"), "w") as f:
    f.write(str(shim.pid))
os.replace(os.path.join(pids, "shim.tmp"), os.path.join(pids, "shim"))
if mode == "die-at-once":
    os._exit(0)
with open(os.path.join(pids, "spawned-line"), "wb") as f:
    f.write(shim.stdout.readline())
while True:
    time.sleep(60)
'''


class Replica:
    """Starts shims and daemon stand-ins under tmp_path and cleans every process up afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.pids_dir = tmp_path / "pids"
        self.pids_dir.mkdir()
        self.log = tmp_path / "logs" / "replica-0.log"
        self.engine = tmp_path / "engine.py"
        self.engine.write_text(ENGINE)
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.popens: list[subprocess.Popen[bytes]] = []

    def shim(self, *steps: str, opts: tuple[str, ...] = (), argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "gpud.supervise.shim", "--log", str(self.log), *opts, "--"]
        cmd += argv if argv is not None else [sys.executable, str(self.engine), str(self.pids_dir), *steps]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True, env=self.env)
        self.popens.append(proc)
        return proc

    def daemon(self, mode: str, *steps: str) -> subprocess.Popen[bytes]:
        script = self.tmp / "daemon.py"
        script.write_text(DAEMON)
        cmd = [sys.executable, str(script), str(self.pids_dir), str(self.log), mode,
               sys.executable, str(self.engine), str(self.pids_dir), *steps]
        proc = subprocess.Popen(cmd, env=self.env)
        self.popens.append(proc)
        return proc

    def pid(self, name: str, timeout: float = 10) -> int:
        path = self.pids_dir / name
        wait_until(path.exists, timeout, f"pid file {name}")
        return int(path.read_text())

    def recorded(self) -> list[int]:
        return [int(p.read_text()) for p in self.pids_dir.iterdir()
                if not p.name.endswith(".tmp") and p.read_text().isdigit()]

    def cleanup(self) -> list[int]:
        """SIGKILL anything of ours still running; returns the stragglers found."""
        stragglers = []
        for proc in self.popens:
            if proc.poll() is None:
                stragglers.append(proc.pid)
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for pid in alive(self.recorded()):
            try:  # only processes started from this test (pid reuse must not hit a stranger)
                if str(self.tmp) in " ".join(psutil.Process(pid).cmdline()):
                    stragglers.append(pid)
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                pass
        return stragglers


@pytest.fixture
def rep(tmp_path: Path) -> Iterator[Replica]:
    replica = Replica(tmp_path)
    yield replica
    assert replica.cleanup() == [], "processes were left behind"


def finish(proc: subprocess.Popen[bytes], timeout: float = 15) -> tuple[int, list[dict[str, object]]]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()]


def log_text(rep: Replica) -> str:
    return "".join(p.read_text() for p in sorted(rep.log.parent.iterdir(), reverse=True))


def test_exit_code_events_and_log(rep: Replica) -> None:
    code, events = finish(rep.shim("print", "exit:3"))
    assert code == 3
    assert events[0]["event"] == "spawned" and isinstance(events[0]["pid"], int)
    assert events[1:] == [{"event": "exited", "code": 3, "signal": None}]
    text = rep.log.read_text()
    assert "hello on stdout\n" in text and "hello on stderr\n" in text
    assert text.rstrip().endswith("exited with code 3")


def test_clean_exit_is_code_zero(rep: Replica) -> None:
    code, events = finish(rep.shim("print"))
    assert code == 0 and events[-1] == {"event": "exited", "code": 0, "signal": None}


def test_engine_killed_by_signal(rep: Replica) -> None:
    code, events = finish(rep.shim("signal:SIGKILL"))
    assert code == 128 + signal.SIGKILL
    assert events[-1] == {"event": "exited", "code": None, "signal": "SIGKILL"}
    assert "killed by SIGKILL" in rep.log.read_text()


def test_exec_failure_reports_127(rep: Replica, tmp_path: Path) -> None:
    code, events = finish(rep.shim(argv=[str(tmp_path / "no-such-engine")]))
    assert code == 127
    assert len(events) == 1 and events[0]["event"] == "exited"
    assert events[0]["code"] == 127 and events[0]["signal"] is None
    assert "no such file" in str(events[0]["error"])
    assert str(events[0]["error"]) in rep.log.read_text()

    not_executable = tmp_path / "plain.txt"
    not_executable.write_text("hello")
    code, events = finish(rep.shim(argv=[str(not_executable)]))
    assert code == 127 and "permission denied" in str(events[0]["error"])


def test_bad_arguments_exit_2(rep: Replica) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gpud.supervise.shim", "--log", str(rep.log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=rep.env)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2 and b"no command given" in err


def test_unwritable_log_is_reported(rep: Replica, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpud.supervise.shim", "--log", str(tmp_path / "file" / "x.log"), "--", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=rep.env)
    code, events = finish(proc)
    assert code == 1 and events[0]["event"] == "exited" and "log file" in str(events[0]["error"])


def test_log_rotation(rep: Replica) -> None:
    # 300 lines of 100 bytes through 1000-byte files: FILE, FILE.1, FILE.2 kept, nothing more.
    code, _ = finish(rep.shim("spam:300", opts=("--log-max-bytes", "1000", "--log-backups", "2")))
    assert code == 0
    names = sorted(p.name for p in rep.log.parent.iterdir())
    assert names == ["replica-0.log", "replica-0.log.1", "replica-0.log.2"]
    for p in rep.log.parent.iterdir():
        assert p.stat().st_size <= 1000
    last = tail(rep.log, 12)
    assert last[-1].endswith("exited normally (code 0)")
    assert last[-2].startswith("line 00299 ") and last[-11].startswith("line 00290 ")


def test_sigterm_stops_engine(rep: Replica) -> None:
    shim = rep.shim("record:engine", "sleep")
    rep.pid("engine")
    shim.send_signal(signal.SIGTERM)
    code, events = finish(shim)
    assert code == 128 + signal.SIGTERM
    assert events[-1] == {"event": "exited", "code": None, "signal": "SIGTERM"}
    assert "received SIGTERM; stopping" in rep.log.read_text()


def test_sigint_stops_engine_that_exits_cleanly(rep: Replica) -> None:
    shim = rep.shim("trap-term", "record:engine", "sleep")
    rep.pid("engine")
    shim.send_signal(signal.SIGINT)
    code, events = finish(shim)
    assert code == 0 and events[-1] == {"event": "exited", "code": 0, "signal": None}


def test_sigterm_reaches_a_stopped_engine(rep: Replica) -> None:
    shim = rep.shim("record:engine", "sleep", opts=("--stop-timeout", "60"))
    engine = rep.pid("engine")
    os.kill(engine, signal.SIGSTOP)
    wait_until(lambda: psutil.Process(engine).status() == psutil.STATUS_STOPPED, 5, "the engine to stop")
    shim.send_signal(signal.SIGTERM)
    code, events = finish(shim)  # well before the 60 s stop timeout: SIGCONT follows SIGTERM
    assert code == 128 + signal.SIGTERM
    assert events[-1] == {"event": "exited", "code": None, "signal": "SIGTERM"}


def test_sigterm_kills_stubborn_grandchild_after_timeout(rep: Replica) -> None:
    shim = rep.shim("stubborn", "record:engine", "sleep", opts=("--stop-timeout", "0.5"))
    pids = [rep.pid("engine"), rep.pid("stubborn")]
    started = time.monotonic()
    shim.send_signal(signal.SIGTERM)
    code, events = finish(shim)
    elapsed = time.monotonic() - started
    assert code == 128 + signal.SIGTERM
    assert elapsed >= 0.5, "SIGKILL came before the stop timeout"
    assert alive(pids) == []
    assert "sending SIGKILL to 1 process(es)" in rep.log.read_text()


def test_sigterm_kills_escaped_grandchild(rep: Replica) -> None:
    shim = rep.shim("escape", "record:engine", "sleep")
    engine, escaped = rep.pid("engine"), rep.pid("escaped")
    # The shim is a subreaper: the detached grandchild is re-parented to it, not to init.
    wait_until(lambda: psutil.Process(escaped).ppid() == shim.pid, 5, "re-parenting to the shim")
    assert os.getsid(escaped) != os.getsid(shim.pid)
    shim.send_signal(signal.SIGTERM)
    code, _ = finish(shim)
    assert code == 128 + signal.SIGTERM
    assert alive([engine, escaped]) == []


def test_engine_exit_cleans_up_leftovers(rep: Replica) -> None:
    shim = rep.shim("stubborn", "escape", "exit:4", opts=("--stop-timeout", "0.3"))
    pids = [rep.pid("stubborn"), rep.pid("escaped")]
    code, events = finish(shim)
    assert code == 4 and events[-1] == {"event": "exited", "code": 4, "signal": None}
    assert alive(pids) == []
    assert "the engine exited; stopping the processes it left behind" in rep.log.read_text()


def test_daemon_sigkill_leaves_nothing(rep: Replica) -> None:
    daemon = rep.daemon("wait", "stubborn", "escape", "record:engine", "sleep")
    names = ["shim", "engine", "stubborn", "escaped"]
    pids = [rep.pid(n) for n in names]
    wait_until(lambda: (rep.pids_dir / "spawned-line").exists(), 10, "the spawned event")
    assert json.loads((rep.pids_dir / "spawned-line").read_text()) == {"event": "spawned", "pid": pids[1]}
    daemon.kill()
    daemon.wait()
    wait_until(lambda: alive(pids) == [], 5, f"every process of the tree to exit ({names})")
    assert "is gone; stopping" in rep.log.read_text()


def test_daemon_dying_right_after_spawn_leaves_nothing(rep: Replica) -> None:
    daemon = rep.daemon("die-at-once", "stubborn", "escape", "record:engine", "sleep")
    daemon.wait(timeout=15)
    shim = rep.pid("shim")
    wait_until(lambda: alive([shim]) == [], 10, "the shim to exit")
    assert alive(rep.recorded()) == []
