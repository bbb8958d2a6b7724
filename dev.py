#!/usr/bin/env python3
"""Set up and run gpud from a fresh clone with nothing but python3 (3.10+).

    python3 dev.py demo    # create .venv, install gpud, run the demo on simulated GPUs
    python3 dev.py test    # create .venv, install gpud with test tools (and smg, for the cluster tests, where a
                           # wheel exists), run ruff, mypy and the whole test suite
    python3 dev.py setup   # only create/refresh .venv

The venv is refreshed only when pyproject.toml changed since the last install (a stamp file records it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".gpud-installed"
NO_SMG = VENV / ".gpud-no-smg"  # smg could not be installed for this pyproject.toml: do not try each run


def run(*cmd: str | Path) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


def _pyproject_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def setup_cluster_tests() -> None:
    """Best effort: the Shepherd Model Gateway (the `cluster` extra) for tests/cluster/test_smg.py, which are
    skipped, with their reason, where the platform has no smg wheel (it is never built from source here)."""
    if (VENV / "bin" / "smg").exists() or (NO_SMG.exists() and NO_SMG.read_text() == _pyproject_hash()):
        return
    print("installing the Shepherd Model Gateway (smg) for the cluster tests …", flush=True)
    quiet = [] if os.environ.get("CI") else ["-q"]
    if run(PY, "-m", "pip", "install", *quiet, "--only-binary=smg", "-e", ".[cluster]") != 0:
        print("smg could not be installed here; the cluster tests will be skipped.", flush=True)
        NO_SMG.write_text(_pyproject_hash())


def setup() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file is what runs on an older python3
        sys.exit(f"gpud needs Python 3.10 or newer; this is {sys.version.split()[0]}.")
    if not PY.exists():
        print(f"creating {VENV} …", flush=True)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except Exception as exc:  # Debian and Ubuntu: ensurepip lives in python3-venv
            shutil.rmtree(VENV, ignore_errors=True)  # never a half-made .venv that the next run would trust
            sys.exit(f"Cannot create {VENV}: {exc}. On Debian or Ubuntu: sudo apt-get install python3-venv")
    want = _pyproject_hash()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    print("installing gpud and its dependencies into .venv …", flush=True)
    quiet = [] if os.environ.get("CI") else ["-q"]
    if run(PY, "-m", "pip", "install", *quiet, "--upgrade", "pip") != 0:
        sys.exit("pip could not upgrade itself; see the output above.")
    if run(PY, "-m", "pip", "install", *quiet, "-e", ".[test]") != 0:
        sys.exit("Installing gpud failed; see the output above.")
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__.strip())
        return 2
    setup()
    command, rest = argv[0], argv[1:]
    if command == "demo":
        return run(PY, "scripts/demo.py", *rest)
    if command == "test":
        setup_cluster_tests()
        code = run(PY, "-m", "ruff", "check", "gpud", "tests", "bench", "scripts", "dev.py")
        if code != 0:
            return code
        code = run(PY, "-m", "mypy", "gpud")  # strict; see [tool.mypy] in pyproject.toml
        if code != 0:
            return code
        return run(PY, "-m", "pytest", *(rest or ["-q"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
