"""Processes that die with their parent: the prctl(2) calls every child of gpud makes (Linux; elsewhere no-ops).

The parent shim of each replica, the venv builder and its installer, and the proxy workers each ask the kernel
for a signal when their parent goes (PR_SET_PDEATHSIG), so that no child outlives the daemon even when it
is killed with SIGKILL. The shim is also a child subreaper, so that descendants which detach stay its own.

The kernel sends the death signal when the *thread* that forked the child ends: the daemon must spawn
from a long-lived thread (its event loop's, as asyncio.create_subprocess_exec does).
"""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    """prctl(2) through libc; False where unavailable (not Linux) or refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask for `sig` when the parent dies. Usable as a subprocess `preexec_fn`."""
    return prctl(PR_SET_PDEATHSIG, sig)


def kill_with_parent() -> None:
    """`preexec_fn` for a child that must never run on without its parent: SIGKILL when it goes."""
    die_with_parent(signal.SIGKILL)


def become_subreaper() -> bool:
    """Descendants whose parent exits are re-parented to us rather than to init."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)
