"""Per-model virtualenvs, cached by content (SPEC §6, issue #4).

A venv is identified by a key: the hash of a layout version, the interpreter (path, version and the daemon's
package dirs layered beneath it), the normalized requirement set and the index settings that change what gets
installed. Same key → same directory `STATE_DIR/venvs/<key>/`, shared by every model and replica that asks.

The key is computed in `gpud.venv.key` (pure). This module is `VenvStore`, the daemon's side: resolve a
key to a ready venv (building it through `gpud.venv.build` in a subprocess, so the
event loop never blocks and a build can be killed cleanly), list the cached ones and prune unused ones.
The build protocol itself (file lock, temp dir, completion marker, rename) lives in `gpud.venv.build`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gpud
from gpud.errors import GpudError
from gpud.exits import describe_returncode
from gpud.registry import Model, Registry
from gpud.venv.build import LAST_USED_FILE, META_FILE, SIZE_FILE
from gpud.venv.key import (
    Interpreter,
    current_interpreter,
    index_settings,
    normalize_requirements,
    template_key,
    uv_args,
    venv_key,
)

FAILURE_LINES = 6  # installer lines quoted in the message of a failed build


class VenvBuildFailed(GpudError):
    """Building a venv failed; the message quotes the installer's last lines."""


def find_uv() -> str | None:
    """uv's binary: from the `uv` package next to the daemon, else on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        pass
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


@dataclasses.dataclass(frozen=True)
class VenvInfo:
    key: str
    path: Path
    requirements: tuple[str, ...]
    built: bool  # False when it came from the cache

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")


def _virtualenv_version() -> str:
    try:
        return importlib.metadata.version("virtualenv")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- the store -----------------------------------------------------------------------------------------


class VenvStore:
    """The venvs under one directory. One per daemon; safe against other processes using the same dir."""

    def __init__(
        self,
        root: Path,
        *,
        environ: Mapping[str, str] | None = None,
        config_env: Mapping[str, str] | None = None,
        installer: str = "auto",
        interpreter: Interpreter | None = None,
    ) -> None:
        if installer not in ("auto", "uv", "pip"):
            raise ValueError(f"unknown installer {installer!r}")
        self.root = Path(root)
        self.config_env = dict(config_env or {})
        # The daemon's environment under the config's [env]: what the installer sees and what is keyed.
        self.env = {**(os.environ if environ is None else environ), **self.config_env}
        self.uv = find_uv() if installer in ("auto", "uv") else None
        if installer == "uv" and self.uv is None:
            raise ValueError("uv is not installed")
        self.interpreter = interpreter or current_interpreter()
        self.index = index_settings(self.env)
        self.template = template_key(self.interpreter, _virtualenv_version(), seed_pip=self.uv is None)
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: Counter[str] = Counter()  # keys being resolved now: prune leaves them alone
        self._measuring: set[asyncio.Future[int]] = set()

    # ---- keys and paths ---------------------------------------------------------------------------
    def key_for(self, packages: Iterable[str]) -> tuple[str, tuple[str, ...]]:
        requirements = normalize_requirements(packages)
        return venv_key(requirements, self.interpreter, self.index), requirements

    def path_for(self, key: str) -> Path:
        return self.root / key

    def is_complete(self, key: str) -> bool:
        return (self.path_for(key) / META_FILE).is_file()

    def _touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            (self.path_for(key) / LAST_USED_FILE).touch()

    # ---- resolve (build when missing) -------------------------------------------------------------
    async def resolve(self, packages: Iterable[str], on_line: Callable[[str], None] | None = None) -> VenvInfo:
        """The ready venv for `packages`, built first if no process has built it yet."""
        key, requirements = self.key_for(packages)
        self._active[key] += 1
        try:
            if not self.is_complete(key):  # fast path: a cached venv costs a stat and a touch
                lock = self._locks.setdefault(key, asyncio.Lock())
                async with lock:  # one builder per key in this process; the file lock covers the others
                    if not self.is_complete(key):
                        built = await self._build(key, requirements, on_line or (lambda line: None))
                        self._touch(key)
                        if built:  # walking a 10 GB venv takes a while: in a thread, after the model goes on
                            measuring = asyncio.get_running_loop().run_in_executor(None, self.measure, key)
                            self._measuring.add(measuring)
                            measuring.add_done_callback(self._measuring.discard)
                        return VenvInfo(key, self.path_for(key), requirements, built=built)
            self._touch(key)
            return VenvInfo(key, self.path_for(key), requirements, built=False)
        finally:
            self._active[key] -= 1
            if self._active[key] <= 0:
                del self._active[key]

    def _job(self, key: str, requirements: tuple[str, ...]) -> dict[str, Any]:
        installer = "uv" if self.uv else "pip"
        return {
            "root": str(self.root), "key": key, "requirements": list(requirements),
            "installer": installer, "uv": self.uv, "installer_args": uv_args(self.env) if self.uv else [],
            "layer": list(self.interpreter.layer), "template": self.template, "parent_pid": os.getpid(),
        }

    async def _build(self, key: str, requirements: tuple[str, ...], on_line: Callable[[str], None]) -> bool:
        """Run the builder; True if it built the venv, False if another process had built it meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in self.env.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        bootstrap = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from gpud.venv.build import main; "
                     "sys.exit(main(sys.argv[1:]))")
        gpud_root = str(Path(gpud.__file__).resolve().parent.parent)
        proc = await asyncio.create_subprocess_exec(
            self.interpreter.path, "-c", bootstrap, gpud_root, json.dumps(self._job(key, requirements)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=env, cwd=str(self.root), limit=1 << 20,
        )
        tail: deque[str] = deque(maxlen=FAILURE_LINES)
        error: str | None = None
        built = False
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                text = raw.decode(errors="replace").rstrip("\r\n")
                try:
                    event = json.loads(text)
                except ValueError:
                    event = None
                if not isinstance(event, dict) or "gpud" not in event:
                    # Stray output of a library: progress, and worth quoting if the build fails.
                    event = {"gpud": "line", "line": text, "output": True}
                if event["gpud"] == "line":
                    line = str(event.get("line", ""))
                    if line.strip() and event.get("output"):
                        tail.append(line.strip()[:300])
                    on_line(line)
                elif event["gpud"] == "done":
                    built = bool(event.get("built"))
                elif event["gpud"] == "error":
                    error = str(event.get("message"))
            rc = await proc.wait()
        except BaseException:
            # The model stopped, the daemon shuts down, or reading its output failed (an overlong line, an
            # error in on_line): never leave a builder behind holding the key's lock. On SIGTERM it removes
            # its temp dir.
            if proc.returncode is None:
                proc.terminate()
                await asyncio.shield(proc.wait())
            raise
        if rc != 0 or not self.is_complete(key):
            reason = error or f"the venv builder failed ({describe_returncode(rc)})"
            last = " | ".join(tail)
            raise VenvBuildFailed(
                f"Could not build the virtualenv for {' '.join(requirements)}: {reason}"
                + (f"; the last lines: {last}" if last else "."),
                details={"key": key, "last_lines": list(tail)},
            )
        return built

    # ---- hooks for the supervisor and the model service ------------------------------------------
    def python_for(self, model: Model) -> tuple[str, str | None]:
        if model.venv:
            path = Path(model.venv["path"])
            return str(path / "bin" / "python"), str(path / "bin")
        if model.spec.venv_packages:
            # Its build failed and something launches it anyway (a restart): never run it without its packages.
            raise VenvBuildFailed(
                f"The virtualenv of model {model.name!r} is not built (its build failed); stop the model and "
                "start it again to retry the build."
            )
        return sys.executable, None

    def extra_env_for(self, model: Model) -> dict[str, str]:
        """VIRTUAL_ENV, and the venv's bin/ first on the PATH the replica would otherwise get."""
        if not model.venv:
            return {}
        spec = model.spec
        if "PATH" in spec.unset_env:
            base = spec.env.get("PATH", "")
        else:
            base = spec.env.get("PATH") or self.config_env.get("PATH") or os.environ.get("PATH", "")
        bin_dir = str(Path(model.venv["path"]) / "bin")
        return {"VIRTUAL_ENV": model.venv["path"], "PATH": bin_dir + (os.pathsep + base if base else "")}

    def preparer(self, registry: Registry) -> Callable[[Model], Awaitable[None]]:
        """ModelService's prepare hook: resolve the model's venv, streaming build output as progress."""

        async def prepare(model: Model) -> None:
            if not model.spec.venv_packages:
                model.venv = None
                return

            def on_line(line: str) -> None:
                registry.publish({"type": "progress", "name": model.name, "phase": "venv", "line": line})

            info = await self.resolve(model.spec.venv_packages, on_line)
            # No await between resolve's end and this: prune cannot slip in and see the venv unused.
            model.venv = {"path": str(info.path), "packages": list(model.spec.venv_packages), "key": info.key}
            registry.changed(model.name)

        return prepare

    # ---- list and prune ---------------------------------------------------------------------------
    def measure(self, key: str) -> int:
        """Bytes of the files of a venv (symlinks as themselves), saved in its size file."""
        path, total = self.path_for(key), 0
        for dirpath, _dirnames, filenames in os.walk(path):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        with contextlib.suppress(OSError):  # pruned meanwhile: nothing to record
            part = path / f"{SIZE_FILE}.{uuid.uuid4().hex[:8]}"
            part.write_text(str(total))
            os.rename(part, path / SIZE_FILE)
        return total

    def _size(self, key: str) -> int:
        try:
            return int((self.path_for(key) / SIZE_FILE).read_text())
        except (OSError, ValueError):
            # Not measured yet (built a moment ago, or the daemon stopped first): rare, measure it now.
            return self.measure(key)

    def users(self, registry: Registry) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for model in registry:
            if model.venv and model.venv.get("key"):
                users.setdefault(model.venv["key"], []).append(model.name)
        return users

    def _complete_keys(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.root))
        except OSError:
            return []
        return [e for e in entries if not e.startswith(".") and (self.root / e / META_FILE).is_file()]

    def list_json(self, registry: Registry | dict[str, list[str]]) -> list[dict[str, Any]]:
        """`gpud venv list`: every complete venv, with the models that use it. Reads small files only: the
        size was measured once after the build (walking a 10 GB venv on every list would stall the daemon)."""
        users = registry if isinstance(registry, dict) else self.users(registry)
        out = []
        for key in self._complete_keys():
            path = self.path_for(key)
            try:
                meta = json.loads((path / META_FILE).read_text())
            except (OSError, ValueError):
                meta = {}
            try:
                last_used = (path / LAST_USED_FILE).stat().st_mtime
            except OSError:
                last_used = meta.get("created")
            out.append({
                "key": key, "path": str(path), "packages": list(meta.get("requirements") or []),
                "size_bytes": self._size(key), "last_used": last_used,
                "created": meta.get("created"), "models": sorted(users.get(key, [])),
            })
        return out

    def _lock_free(self, key: str) -> bool:
        """True when no process holds the key's build lock (nobody builds it now)."""
        try:
            fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing drops a lock we took

    async def prune(self, registry: Registry) -> list[str]:
        """Remove every venv no model uses and nobody is building; returns the removed paths."""
        users = self.users(registry)
        doomed: list[tuple[str, Path]] = []
        for key in self._complete_keys():
            if key in users or key in self._active or not self._lock_free(key):
                continue
            # Out of sight at once (a rename), then deleted in a thread: a resolve that comes after the
            # rename simply builds anew, and the loop never waits for a large rmtree.
            trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path_for(key), trash)
            except OSError:
                continue
            doomed.append((str(self.path_for(key)), trash))
        leftovers = [self.root / e for e in self._stale_entries()]
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, shutil.rmtree, t, True)
                               for t in [t for _, t in doomed] + leftovers))
        return [path for path, _ in doomed]

    def _stale_entries(self) -> list[str]:
        """Trash of an interrupted prune, and temp dirs of builds whose builder is gone (lock free)."""
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        stale = []
        for entry in entries:
            if entry.startswith(".trash-"):
                stale.append(entry)
            elif entry.startswith(".base") and entry != f".{self.template}" and (self.root / entry).is_dir():
                if self._lock_free(entry[1:]):  # the base venv of another interpreter or installer
                    stale.append(entry)
            elif entry.startswith(".tmp-"):
                key = entry.split("-")[1]
                if key not in self._active and self._lock_free(key):
                    stale.append(entry)
        return stale
