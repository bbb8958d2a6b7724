"""The venv builder: a short-lived process that builds one venv key, started by `gpud.venv.store.VenvStore`.

Protocol with the daemon: one JSON object per line on stdout: `{"gpud": "line", "line"}` for progress (our
phases, and the installer's output with `"output": true`), `{"gpud": "error", "message"}` before a failing
exit, `{"gpud": "done", "built": bool}` at the end. Any other output is shown as progress too.

Why a separate process: the build takes seconds to minutes and must not block the daemon's loop; a
process can hold the per-key file lock in a plain blocking call; and killing it (daemon shutdown, model
stopped) is clean. The steps, all under the per-key lock (check → lock → re-check):

1. remove what an earlier, interrupted build left (temp dirs of this key, a final dir without marker);
2. copy the base venv into `.tmp-<key>-<pid>/` next to the final dir. The base venv is an empty venv made
   once per interpreter with `virtualenv` (same protocol, its own lock);
3. install the requirements with uv (or pip inside the venv, seeded by virtualenv, when uv is missing),
   then add the layer `.pth` that keeps the daemon's packages importable beneath the venv's own;
4. rewrite the temp and base paths to the final one in bin/ scripts (shebangs, activate scripts);
5. write the metadata file, which is the completion marker, last; rename the dir into place.

A failure or a stop signal removes the temp dir. SIGKILL cannot be caught: the temp dir stays, step 1 of
the next build removes it. The lock's file descriptor is inherited by the installer, so the lock is not
free while an orphaned installer might still write into a temp dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpud.exits import describe_returncode
from gpud.supervise.lifeline import die_with_parent, kill_with_parent

META_FILE = ".gpud-venv.json"  # metadata and completion marker: written last
LAST_USED_FILE = ".gpud-last-used"  # its mtime is when a model last resolved this venv
SIZE_FILE = ".gpud-size"  # bytes of the venv, measured by the daemon after the build (off the critical path)
LAYER_PTH = "zzz_gpud_layer.pth"  # .pth files run in name order: the layer comes after the venv's own
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Interrupted(BaseException):
    """A stop signal arrived; unwinding removes the temp dir."""


class BuildFailed(Exception):
    pass


def emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"gpud": kind, **fields}) + "\n")
    sys.stdout.flush()


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree, whatever is there."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def clean_stale(root: Path, key: str, final: Path) -> None:
    """Under the lock: anything of this key that is not a complete venv is a leftover."""
    for entry in os.listdir(root):
        if entry.startswith(f".tmp-{key}-"):
            emit("line", line=f"removing the leftovers of an interrupted build ({entry})")
            remove_tree(root / entry)
    if final.exists() and not (final / META_FILE).is_file():
        emit("line", line="removing an incomplete virtualenv left by an interrupted build")
        aside = root / f".tmp-{key}-stale"
        os.rename(final, aside)
        remove_tree(aside)


def create_venv(tmp: Path, seed_pip: bool) -> Path:
    """A bare venv at `tmp`; returns its site-packages dir."""
    import virtualenv  # imported here: a cache hit in the daemon never pays for it

    args = [str(tmp), "--no-periodic-update", "--quiet"]
    if not seed_pip:
        args.append("--no-seed")  # uv installs from outside; the venv needs no pip of its own
    session = virtualenv.cli_run(args, setup_logging=False)
    return Path(session.creator.purelib)


def write_layer(site_packages: Path, layer: list[str]) -> None:
    """`site.addsitedir` (not a bare path) so that the daemon's own .pth files run too: editable installs
    of gpud rely on them."""
    lines = [f"import site; site.addsitedir({d!r})" for d in layer]
    (site_packages / LAYER_PTH).write_text("\n".join(lines) + "\n")


def installer_command(job: dict[str, Any], tmp: Path) -> list[str]:
    python = str(tmp / "bin" / "python")
    if job["installer"] == "uv":
        return [job["uv"], "--color", "never", "pip", "install", "--python", python,
                *job["installer_args"], *job["requirements"]]
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *job["requirements"]]


def run_installer(cmd: list[str], lock_fd: int) -> None:
    """Run the installer, streaming its lines; raise BuildFailed with its last lines when it fails."""
    tail: deque[str] = deque(maxlen=6)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, pass_fds=(lock_fd,), preexec_fn=kill_with_parent)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ANSI_RE.sub("", raw.decode(errors="replace")).rstrip()
            if line.strip():
                tail.append(line.strip())
            emit("line", line=line[:2000], output=True)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        tool = "pip install" if cmd[1] == "-m" else "uv pip install"
        raise BuildFailed(f"{tool} failed ({describe_returncode(rc)})")


def relocate(tmp: Path, final: Path, *others: Path) -> None:
    """Scripts written during the build name the temp dir (shebangs, activate), or the template the venv was
    copied from: point them at the final dir. Only text files are touched; a compiled executable keeps its
    bytes."""
    olds, new = [str(p).encode() for p in (tmp, *others)], str(final).encode()
    targets = [p for p in (tmp / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    targets.append(tmp / "pyvenv.cfg")
    for path in targets:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not any(old in data for old in olds) or not (
                data.startswith(b"#!") or path.name.startswith("activate") or path.name == "pyvenv.cfg"):
            continue
        mode = path.stat().st_mode
        for old in olds:
            data = data.replace(old, new)
        path.write_bytes(data)
        os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(meta: dict[str, Any], tmp: Path, final: Path) -> None:
    (tmp / LAST_USED_FILE).touch()
    part = tmp / (META_FILE + ".part")
    with open(part, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(part, tmp / META_FILE)  # the marker, written last
    _fsync_dir(tmp)
    os.rename(tmp, final)  # the commit: the venv appears complete, or not at all
    _fsync_dir(final.parent)


@contextlib.contextmanager
def key_lock(root: Path, key: str, waiting: str) -> Iterator[int]:
    """The per-key build lock (flock on `.KEY.lock`). Its descriptor is inheritable: the installer holds it too."""
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.set_inheritable(fd, True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit("line", line=waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def build_dir(root: Path, key: str, final: Path, fill: Callable[[Path, int], dict[str, Any]], what: str) -> bool:
    """Check → lock → re-check → clean leftovers → fill a temp dir → marker → rename. False if it was there."""
    with key_lock(root, key, f"waiting for another build of this {what}") as fd:
        if (final / META_FILE).is_file():
            return False
        clean_stale(root, key, final)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        try:
            commit(fill(tmp, fd), tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
    return True


def ensure_template(root: Path, job: dict[str, Any]) -> tuple[Path, str]:
    """An empty venv made once per interpreter (and virtualenv version, and seeding) with virtualenv; every
    build starts from a copy of it, which takes milliseconds instead of virtualenv's ~150 ms. Returns its
    path and its site-packages dir relative to it."""
    key = job["template"]
    final = root / f".{key}"

    def fill(tmp: Path, fd: int) -> dict[str, Any]:
        emit("line", line="creating the base virtualenv for this interpreter")
        purelib = create_venv(tmp, seed_pip=job["installer"] == "pip")
        relocate(tmp, final)
        return {"template": key, "python": sys.executable, "created": time.time(),
                "purelib": str(purelib.relative_to(tmp))}

    if not (final / META_FILE).is_file():
        build_dir(root, key, final, fill, "base virtualenv")
    return final, json.loads((final / META_FILE).read_text())["purelib"]


def build(job: dict[str, Any]) -> int:
    root, key = Path(job["root"]), job["key"]
    root.mkdir(parents=True, exist_ok=True)
    final = root / key

    def fill(tmp: Path, lock_fd: int) -> dict[str, Any]:
        template, purelib = ensure_template(root, job)
        emit("line", line=f"creating a virtualenv for {' '.join(job['requirements'])}")
        shutil.copytree(template, tmp, symlinks=True)
        for name in (META_FILE, LAST_USED_FILE):
            (tmp / name).unlink(missing_ok=True)
        emit("line", line=f"installing with {job['installer']}")
        run_installer(installer_command(job, tmp), lock_fd)
        # The layer comes after the install: pip would take the daemon's packages as already installed, and
        # the venv's content must depend on its key alone.
        write_layer(tmp / purelib, job["layer"])
        relocate(tmp, final, template)
        return {
            "key": key, "requirements": job["requirements"], "python": sys.executable,
            "python_version": sys.version.split()[0], "installer": job["installer"], "created": time.time(),
        }

    built = build_dir(root, key, final, fill, "virtualenv")
    if built:
        emit("line", line=f"virtualenv ready: {final}")
    emit("done", built=built)
    return 0


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    die_with_parent(signal.SIGTERM)
    if os.getppid() != job["parent_pid"]:  # the daemon died before prctl took effect
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return build(job)
    except BuildFailed as exc:
        emit("error", message=str(exc))
    except Interrupted as exc:
        emit("error", message=f"the build was stopped ({exc})")
    except Exception as exc:  # virtualenv's own errors, disk full…: one line, not a traceback
        emit("error", message=f"{type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":  # pragma: no cover - started by gpud.venv.store
    sys.exit(main(sys.argv[1:]))
