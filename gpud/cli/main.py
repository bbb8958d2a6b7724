"""The `gpud` entry point (SPEC §5): dispatch, and every error as one sentence with its exit code.

Read commands must feel instant, so nothing heavy is imported at module level: the daemon (`gpud daemon`)
and the placement modules (`gpud plan --gpus`) are imported only by the commands that need them.

Exit codes: 0 ok · 1 other error · 2 invalid input or usage · 3 daemon unreachable · 4 does not fit ·
5 not found · 130 interrupted while waiting (the operation goes on in the daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gpud.cli.commands import EXIT_INTERRUPTED, err, out
from gpud.cli.parser import UsageError, build_parser, command_index, parse
from gpud.errors import GpudError


def _run_daemon(argv: list[str], at: int) -> int:
    """`gpud [--socket P] daemon …`: hand the rest to the daemon untouched (a global --socket goes first)."""
    ns = build_parser().parse_args(argv[:at] + ["status"])  # handles --version/--help and checks --socket
    rest = argv[at + 1:]
    if ns.socket is not None:
        rest = ["--socket", ns.socket, *rest]  # a --socket after `daemon` comes later and wins
    from gpud.daemon import run_daemon

    return run_daemon(rest)


def _sentence(text: str) -> str:
    text = text.strip()
    if not text.startswith("gpud"):  # the program's name stays lower case
        text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns: argparse.Namespace | None = None
    try:
        at = command_index(args)
        if at is not None and args[at] == "daemon":
            return _run_daemon(args, at)
        ns = parse(args)
        return int(ns.func(ns))
    except UsageError as exc:
        err(f"{_sentence(exc.message).rstrip('.')}; see `{exc.prog} --help`.")
        return 2
    except GpudError as exc:
        plan = exc.details.get("plan")
        if ns is not None and getattr(ns, "output", None) == "json" and isinstance(plan, dict):
            out(json.dumps(plan, indent=2))  # a refusal with a JSON shape still prints it (SPEC §5)
        err(_sentence(exc.message))
        return exc.exit_code
    except KeyboardInterrupt:
        err("Interrupted.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`gpud model list | head`): no message, and no second error at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        if os.environ.get("GPUD_DEBUG"):
            raise
        err(f"Unexpected error ({type(exc).__name__}: {exc}); set GPUD_DEBUG=1 to see the traceback.")
        return 1
