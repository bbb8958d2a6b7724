"""The per-replica parent shim: runs one engine command and guarantees its whole tree dies with it.

    python -m gpud.supervise.shim --log FILE [--log-max-bytes N] [--log-backups N] [--stop-timeout S]
                          [--parent-pid PID] -- ARGV...
    python -m gpud.supervise.shim --standby      (the same arguments and the environment arrive on stdin)

The daemon starts it with ``start_new_session=True`` and the replica's environment. The shim

* asks for SIGTERM when the daemon dies (``PR_SET_PDEATHSIG``), then compares ``getppid()`` with the
  daemon's pid (``--parent-pid``, else the parent seen at start) to close the race where the daemon
  died first; it also re-checks ``getppid()`` every second in case prctl is unavailable. The kernel
  sends that signal when the *thread* that forked the shim ends, so the daemon must spawn it from a
  long-lived thread (its event loop's, as asyncio.create_subprocess_exec does);
* becomes a child subreaper, so descendants that double-fork or ``setsid`` away are re-parented to
  it rather than to init and stay findable and killable (vLLM's EngineCore and workers outlive a
  SIGKILL of its API server and keep GPU memory);
* runs ARGV in the shim's process group (the shim leads it) with stdin from /dev/null and stdout+stderr into a pipe that it
  copies into FILE with size-based rotation (FILE, FILE.1 … FILE.N);
* speaks JSON lines on its stdout:  ``{"event": "spawned", "pid": N}`` once the engine runs, and
  finally ``{"event": "exited", "code": int|null, "signal": "SIGKILL"|null}`` for the engine's status
  (plus ``"error": sentence`` when ARGV could not be executed: code 127);
* on SIGTERM/SIGINT/SIGHUP/SIGQUIT, on the daemon's death, or when the engine exits by itself:
  SIGTERM (and SIGCONT) to every descendant, SIGKILL to those left after ``--stop-timeout`` seconds
  (at most ORPHAN_STOP_S once the daemon is gone: nobody waits for a drain then), reaps them all, reports, and exits with the engine's code (128+N if signal N killed it). It never exits while a
  descendant is left.

It is a plain selectors loop rather than asyncio: it starts for every replica, so it stays small.
"""

from __future__ import annotations

import argparse
import enum
import errno
import fcntl
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from gpud.errors import InvalidInput
from gpud.exits import describe_exit, signal_name
from gpud.supervise.lifeline import become_subreaper, die_with_parent, kill_with_parent
from gpud.supervise.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingWriter
from gpud.units import parse_size

F_SETPIPE_SZ = 1031
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PARENT_POLL_S = 1.0  # how often getppid() is re-checked while the engine runs
# With the daemon gone nobody waits for a drain, and no process of a replica may outlive it by more than
# a moment (SPEC §7, "within 5 s"): the SIGTERM-to-SIGKILL grace is cut to this.
ORPHAN_STOP_S = 2.0
STOP_TICK_S = 0.1  # how often the tree is re-listed while stopping (new forks get signalled too)
READ_CHUNK = 1024 * 1024
EXIT_EXEC_FAILED = 127


class Pumped(enum.Enum):
    """What one read of the engine's output found."""

    DATA = "data"
    EMPTY = "empty"  # nothing for now
    EOF = "eof"


def exec_error_sentence(program: str, err: BaseException) -> str:
    """One sentence for a person about why ARGV could not be started."""
    code = getattr(err, "errno", None)
    if code == errno.ENOENT:
        why = "no such file or command (is it installed and on PATH?)"
    elif code == errno.EACCES:
        why = "permission denied (is the file executable?)"
    elif code == errno.ENOEXEC:
        why = "it is not a program this system can run (exec format error; missing #! line?)"
    elif isinstance(err, OSError) and err.strerror:
        why = err.strerror[0].lower() + err.strerror[1:]
    else:
        why = str(err) or type(err).__name__
    return f"Cannot start {program!r}: {why}."


class Shim:
    """One engine process and its descendants, from spawn to the last reaped zombie."""

    def __init__(
        self, argv: list[str], writer: RotatingWriter, stop_timeout: float, parent_pid: int,
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        self.argv = argv
        self.writer = writer
        self.stop_timeout = stop_timeout
        self.parent_pid = parent_pid
        self.emit = emit
        self.me = psutil.Process()
        self.engine_pid = -1
        self.engine_status: int | None = None  # raw wait status once reaped
        self.stopping = False
        self.deadline = 0.0
        self.termed: set[psutil.Process] = set()
        self.kill_logged = False
        self.orphaned = False  # the stop deadline was shortened because the daemon is gone
        self.log_error_reported = False
        self.pending_signals: list[int] = []
        self.sig_r = self.sig_w = self.log_r = -1

    # -- logging -------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        """A line from the shim itself in the replica's log."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write_log(f"[gpud {stamp}] {message}\n".encode())

    def _write_log(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except OSError as err:
            # Never die on a full disk: the engine must keep running and be stopped cleanly. Say so
            # once on stderr (which may be a pipe nobody reads, so never more than once).
            if not self.log_error_reported:
                self.log_error_reported = True
                try:
                    os.write(2, f"gpud.supervise.shim: cannot write the log {self.writer.path}: {err}\n".encode())
                except OSError:
                    pass

    # -- setup ---------------------------------------------------------------------------------

    def install_signals(self) -> None:
        """Signal handlers only record; the loop wakes through the wakeup fd and acts."""
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def spawn(self) -> str | None:
        """Start the engine; None on success, else the sentence saying why it could not start."""
        self.log_r, log_w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.log_r, F_SETPIPE_SZ, READ_CHUNK)  # fewer wake-ups for chatty engines
        except OSError:
            pass
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log_w, stderr=log_w,
                close_fds=True, restore_signals=True,
                # Should the shim itself be SIGKILLed (the OOM killer), the engine goes too instead of running
                # on unsupervised.
                preexec_fn=kill_with_parent,
            )
        except (OSError, subprocess.SubprocessError) as err:
            return exec_error_sentence(self.argv[0], err)
        finally:
            os.close(log_w)
        # The loop reaps with waitpid(-1); tell Popen the child is not its business any more so it
        # never waits on it nor warns about it.
        proc.returncode = 0
        self.engine_pid = proc.pid
        os.set_blocking(self.log_r, False)
        return None

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Pump, supervise and clean up until no descendant is left; returns the shim's exit code."""
        self.emit({"event": "spawned", "pid": self.engine_pid})
        self.note(f"started pid {self.engine_pid}: {shlex.join(self.argv)}")
        sel = selectors.DefaultSelector()
        sel.register(self.sig_r, selectors.EVENT_READ, "signal")
        sel.register(self.log_r, selectors.EVENT_READ, "log")
        try:
            while True:
                for key, _ in sel.select(self._timeout()):
                    if key.data == "log":
                        if self.pump() is Pumped.EOF:
                            sel.unregister(self.log_r)
                    else:
                        self._drain_wakeup()
                self.handle_signals()
                no_children = self.reap()
                if no_children:
                    break
                if not self.stopping:
                    if self.engine_status is not None:
                        self.request_stop("the engine exited; stopping the processes it left behind")
                    elif self.parent_gone():
                        self.request_stop(f"the daemon (pid {self.parent_pid}) is gone; stopping")
                if self.stopping:
                    self.enforce()
        finally:
            sel.close()
        while self.pump() is Pumped.DATA:  # every writer is gone now: read what is left
            pass
        return self.finish()

    def _timeout(self) -> float:
        if not self.stopping:
            return PARENT_POLL_S
        left = self.deadline - time.monotonic()
        # Past the deadline everything has had its SIGKILL: poll at the tick, never spin (a process in D state
        # during CUDA teardown may take seconds to go).
        return STOP_TICK_S if left <= 0 else min(STOP_TICK_S, left)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.sig_r, 4096):
                pass
        except BlockingIOError:
            pass

    def pump(self) -> Pumped:
        """Copy what the engine wrote into the log."""
        try:
            data = os.read(self.log_r, READ_CHUNK)
        except BlockingIOError:
            return Pumped.EMPTY
        if not data:
            return Pumped.EOF
        self._write_log(data)
        return Pumped.DATA

    def handle_signals(self) -> None:
        pending, self.pending_signals = self.pending_signals, []
        for signum in pending:
            if signum in STOP_SIGNALS:
                if self.parent_gone():
                    self.request_stop(f"the daemon (pid {self.parent_pid}) is gone; stopping")
                else:
                    self.request_stop(f"received {signal_name(signum)}; stopping")

    def reap(self) -> bool:
        """Reap every exited child (the engine and adopted orphans); True once there are none left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                return False
            if pid == self.engine_pid:
                self.engine_status = status

    def request_stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.deadline = time.monotonic() + self.stop_timeout
        self.note(reason)
        self.enforce()

    def enforce(self) -> None:
        """SIGTERM each descendant once (new ones included); after the deadline, SIGKILL them all."""
        # Checked on every tick, not only when the stop began: the daemon may die during a graceful stop,
        # and a SIGTERM from PR_SET_PDEATHSIG can be handled before getppid() shows the new parent.
        if not self.orphaned and self.parent_gone():
            self.orphaned = True
            self.deadline = min(self.deadline, time.monotonic() + ORPHAN_STOP_S)
        try:
            procs = self.me.children(recursive=True)
        except psutil.Error:
            return
        kill = time.monotonic() >= self.deadline
        if kill and procs and not self.kill_logged:
            self.kill_logged = True
            self.note(f"sending SIGKILL to {len(procs)} process(es) still running after "
                      f"{min(self.stop_timeout, ORPHAN_STOP_S) if self.orphaned else self.stop_timeout:g} s")
        for proc in procs:
            if not kill and proc in self.termed:
                continue
            try:
                if kill:
                    proc.send_signal(signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)  # a stopped process must run to see SIGTERM
                    self.termed.add(proc)
            except psutil.Error:
                continue

    def kill_everything(self) -> None:
        """Last resort: SIGKILL every descendant until none is left, reaping as they go."""
        while True:
            try:
                for proc in self.me.children(recursive=True):
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        pass
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
            except (OSError, psutil.Error):
                continue

    def finish(self) -> int:
        """Report the engine's status and return the shim's exit code."""
        os.close(self.log_r)
        raw = os.waitstatus_to_exitcode(self.engine_status if self.engine_status is not None else 0)
        code: int | None = raw
        sig: str | None = None
        exit_code = raw
        if raw < 0:  # killed by signal -raw
            code, sig, exit_code = None, signal_name(-raw), 128 - raw
        self.note(f"{self.argv[0]} {describe_exit(code, sig)}")
        self.emit({"event": "exited", "code": code, "signal": sig})
        return exit_code


def _emit(event: dict[str, Any]) -> None:
    """One JSON line to the daemon; a daemon that is gone is not an error here."""
    try:
        os.write(1, (json.dumps(event) + "\n").encode())
    except OSError:
        pass


def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in args:
        own, argv = args, []
    else:
        split = args.index("--")
        own, argv = args[:split], args[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m gpud.supervise.shim", description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="log file of the replica (rotated)")
    parser.add_argument("--log-max-bytes", default=str(DEFAULT_MAX_BYTES), help="size of one log file")
    parser.add_argument("--log-backups", type=int, default=DEFAULT_BACKUPS, help="rotated files kept")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("--parent-pid", type=int, default=None, help="the daemon's pid (default: our parent)")
    ns = parser.parse_args(own)
    if not argv:
        parser.error("no command given after --")
    if ns.stop_timeout < 0:
        parser.error("--stop-timeout cannot be negative")
    try:
        ns.log_max_bytes = parse_size(ns.log_max_bytes, what="--log-max-bytes")
    except InvalidInput as err:
        parser.error(err.message)
    return ns, argv


def await_order() -> list[str] | None:
    """`--standby`: started ahead of need, with the imports done, wait for one order on stdin — a JSON line
    {"args": [shim arguments], "env": {the replica's environment}} — then become that replica's shim (see
    gpud.supervise.standby). None when the daemon closes the pipe (or dies) without sending one."""
    die_with_parent(signal.SIGTERM)  # a standby never outlives the daemon either
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    order = json.loads(line)
    os.environ.clear()
    os.environ.update(order["env"])  # the engine inherits it, as it would have from a shim started with it
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return [str(a) for a in order["args"]]


def main(args: list[str] | None = None) -> int:
    observed_parent = os.getppid()
    args = sys.argv[1:] if args is None else args
    if args == ["--standby"]:
        ordered = await_order()
        if ordered is None:
            return 0
        args = ordered
    ns, argv = parse_args(args)
    parent_pid = ns.parent_pid if ns.parent_pid is not None else observed_parent
    if os.getpgrp() != os.getpid():
        # The daemon asks for a new session; if it did not, at least lead a process group so that
        # the engine's group is ours and can be signalled as one.
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    try:
        writer = RotatingWriter(ns.log, ns.log_max_bytes, ns.log_backups)
    except (OSError, InvalidInput) as err:
        sentence = f"Cannot open the log file {ns.log}: {getattr(err, 'strerror', None) or err}."
        print(sentence, file=sys.stderr)
        _emit({"event": "exited", "code": 1, "signal": None, "error": sentence})
        return 1
    shim = Shim(argv, writer, ns.stop_timeout, parent_pid, _emit)
    try:
        # Handlers before anything can start: a SIGTERM from here on is a clean stop, never a leak.
        shim.install_signals()
        die_with_parent(signal.SIGTERM)
        if not become_subreaper():
            shim.note("warning: cannot become a child subreaper; processes that detach may escape")
        if shim.parent_gone():  # the daemon died before prctl took effect
            sentence = f"The daemon (pid {parent_pid}) exited before the replica could start."
            shim.note(sentence)
            _emit({"event": "exited", "code": None, "signal": None, "error": sentence})
            return 1
        error = shim.spawn()
        if error is not None:
            shim.note(error)
            _emit({"event": "exited", "code": EXIT_EXEC_FAILED, "signal": None, "error": error})
            return EXIT_EXEC_FAILED
        return shim.run()
    except BaseException as err:
        # A bug in the shim must not break the promise: take the whole tree down before going.
        shim.note(f"internal error, killing every process of the replica: {err!r}")
        shim.kill_everything()
        _emit({"event": "exited", "code": None, "signal": None, "error": f"gpud.supervise.shim failed: {err!r}"})
        raise
    finally:
        writer.close()


if __name__ == "__main__":
    raise SystemExit(main())
