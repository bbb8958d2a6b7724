"""Process-tree helpers for the daemon: list, signal and find replica processes.

Signals go through psutil.Process objects, which check that a pid was not reused by an unrelated
process between listing and signalling.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, ValueError):
        return None


def _tree(root_pid: int) -> list[psutil.Process]:
    root = _process(root_pid)
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree(root_pid: int) -> list[psutil.Process]:
    """root_pid and its descendants as psutil handles: signalling a handle later checks that the pid was not
    reused by an unrelated process meanwhile (psutil compares creation times)."""
    return _tree(root_pid)


def signal_processes(processes: Iterable[psutil.Process], sig: int) -> None:
    """Signal each process that is still the one we saw; vanished or reused pids are skipped."""
    _signal(processes, sig)


def tree_pids(root_pid: int) -> list[int]:
    """root_pid and all its descendants (root first); empty if root_pid is gone."""
    return [p.pid for p in _tree(root_pid)]


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # gone already, or not ours to signal


def kill_tree(root_pid: int, sig: int) -> None:
    """Send sig to root_pid and every descendant, ignoring processes that vanish meanwhile.

    The whole tree is listed before the first signal: once a parent dies its children are
    re-parented and can no longer be found from the root. Children forked while we signal are
    picked up by re-listing below the processes that are still there.
    """
    known = _tree(root_pid)
    seen = {p.pid for p in known}
    batch = known
    for _ in range(5):
        if not batch:
            return
        _signal(batch, sig)
        batch = []
        for proc in known:
            try:
                for child in proc.children(recursive=True):
                    if child.pid not in seen:
                        seen.add(child.pid)
                        batch.append(child)
            except psutil.NoSuchProcess:
                continue
        known.extend(batch)


def alive(pids: Iterable[int]) -> list[int]:
    """The pids that still run (zombies, which only wait to be reaped, do not count)."""
    out = []
    for pid in pids:
        proc = _process(pid)
        if proc is None:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            pass  # exists, and we may not look closer: count it as running
        out.append(pid)
    return out


def _environ_has(pid: str, needle: bytes, prefix: bool) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return False  # another user's process, or gone
    for entry in data.split(b"\0"):
        if (entry.startswith(needle) if prefix else entry == needle):
            return True
    return False


def find_orphans(marker_env: str, value: str | None = None) -> list[int]:
    """Pids (other than ours) whose initial environment holds marker_env (=value, when given).

    gpud uses it at boot to find replica processes left by a previous life of the daemon: every
    replica's environment carries GPUD_MODEL and friends. Unreadable processes are skipped.
    """
    if value is None:
        needle, prefix = f"{marker_env}=".encode(), True
    else:
        needle, prefix = f"{marker_env}={value}".encode(), False
    me = str(os.getpid())
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return sorted(
        int(pid) for pid in entries if pid.isdigit() and pid != me and _environ_has(pid, needle, prefix)
    )
