"""How a process ended, in words a person reads: the one home of those phrases (stdlib only).

The daemon (replica last exits), the parent shim (its log line), the venv store (a failed builder) and the
CLI (tables and failure sentences) all say it the same way: exit 137 reads as what it usually means.
"""

from __future__ import annotations

import signal

# Signals a person recognises by their effect; the rest read "killed by SIGxxx".
_SIGNAL_TEXT = {
    "SIGKILL": "killed by SIGKILL (out of memory? stopped by another program?)",
    "SIGTERM": "terminated by SIGTERM",
    "SIGINT": "interrupted by SIGINT",
    "SIGHUP": "hung up (SIGHUP)",
    "SIGQUIT": "quit (SIGQUIT)",
    "SIGSEGV": "segmentation fault (SIGSEGV)",
    "SIGABRT": "aborted (SIGABRT)",
    "SIGBUS": "bus error (SIGBUS)",
    "SIGFPE": "floating-point exception (SIGFPE)",
    "SIGILL": "illegal instruction (SIGILL)",
    "SIGPIPE": "broken pipe (SIGPIPE)",
    "SIGXCPU": "CPU time limit exceeded (SIGXCPU)",
    "SIGXFSZ": "file size limit exceeded (SIGXFSZ)",
}

_CODE_TEXT = {
    0: "exited normally (code 0)",
    126: "command not executable (exit code 126)",
    127: "command not found (exit code 127)",
}


def signal_name(signum: int) -> str:
    """9 -> "SIGKILL"; an unknown number -> "signal 99"."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(code: int | None, signal_name: str | None) -> str:
    """One phrase for a person about how a process ended (a signal wins over a code)."""
    if signal_name:
        name = signal_name.strip()
        if not name.startswith("signal "):  # "signal 99" stays as signal_name() wrote it
            name = name.upper()
            name = name if name.startswith("SIG") else "SIG" + name
        return _SIGNAL_TEXT.get(name, f"killed by {name}")
    if code is None:
        return "ended with an unknown status"
    if code in _CODE_TEXT:
        return _CODE_TEXT[code]
    if 128 < code < 128 + 65:
        # Shells and wrappers report a child killed by signal N as 128+N.
        return f"exited with code {code} (the code a shell gives a process killed by {_name_of(code - 128)})"
    return f"exited with code {code}"


def describe_returncode(returncode: int) -> str:
    """The phrase for a subprocess return code: negative N means killed by signal N."""
    if returncode < 0:
        return describe_exit(None, signal_name(-returncode))
    return describe_exit(returncode, None)


# describe_exit's parameter shadows signal_name() inside it, as the interface names it.
_name_of = signal_name
