"""One parent shim started ahead of need, so that a replica's start does not wait for a Python interpreter.

Every replica runs under a parent shim (gpud.supervise.shim), a Python process that must exist before the
engine does; its interpreter start and imports cost 100–300 ms, all of it added to a wake's first token
(SPEC §12). The daemon therefore keeps one shim started with `--standby`: imports done, parent-death signal
set, waiting on stdin. A replica start hands it its arguments and environment in one JSON line and it becomes
that replica's shim at once; a new standby is started in the background for the next start. When there is
none (two starts at once, a standby that died) the shim is started the ordinary way; a start that finds one
being started waits for its process (not for its imports: the order waits in its stdin meanwhile).

A standby carries GPUD_INSTANCE like every replica process, so the orphan search of a later daemon on the
same state dir finds it too, and it exits when its stdin closes (shutdown) or its parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SHIM_MODULE = "gpud.supervise.shim"


class ShimStarter:
    """Starts parent shims, from a standby when one is waiting (see the module docstring)."""

    def __init__(self, cwd: Path, standby_env: Mapping[str, str]) -> None:
        self.cwd = cwd
        self.standby_env = dict(standby_env)
        self._standby: asyncio.subprocess.Process | None = None
        self._refilling: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, shim_args: list[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
        """A running shim for these arguments (`--log FILE … -- ARGV…`) and this environment, its stdout a pipe
        of its JSON events; a standby is started for the next call."""
        if self._standby is None and self._refilling is not None:
            # One is being started: its process exists in a moment, and its imports overlap with ours.
            await asyncio.shield(self._refilling)
        proc = await self._order(shim_args, env)
        if proc is None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", SHIM_MODULE, *shim_args, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, start_new_session=True, cwd=str(self.cwd))
        self.warm()
        return proc

    def warm(self) -> None:
        """Have a standby started (in the background) unless one is there or on its way."""
        if self._closed or self._refilling is not None or self._ready() is not None:
            return
        self._refilling = asyncio.get_running_loop().create_task(self._refill(), name="shim standby")

    async def close(self) -> None:
        """No standby left: its stdin closed (it exits at once), killed if it does not."""
        self._closed = True
        if self._refilling is not None:
            self._refilling.cancel()
            await asyncio.gather(self._refilling, return_exceptions=True)
        proc, self._standby = self._standby, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout=5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _ready(self) -> asyncio.subprocess.Process | None:
        if self._standby is not None and self._standby.returncode is not None:
            log.warning("the standby parent shim exited (code %s); the next replica start makes a new one",
                        self._standby.returncode)
            self._standby = None
        return self._standby

    async def _order(self, shim_args: list[str], env: Mapping[str, str]) -> asyncio.subprocess.Process | None:
        proc = self._ready()
        if proc is None or proc.stdin is None:
            return None
        self._standby = None
        order = json.dumps({"args": shim_args, "env": dict(env)}).encode() + b"\n"
        try:
            proc.stdin.write(order)
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):  # it died just now: reap it, start one the usual way
            await proc.wait()
            return None
        return proc

    async def _refill(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", SHIM_MODULE, "--standby", env=self.standby_env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
                cwd=str(self.cwd))
        except OSError as err:
            log.warning("cannot start a standby parent shim: %s", err)
            return
        finally:
            self._refilling = None
        if self._closed:  # close() ran while it started
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
            return
        self._standby = proc
