"""Process-tree helpers on real processes, and the exit-status wording."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from gpud.exits import describe_exit, signal_name
from gpud.supervise.procs import alive, find_orphans, kill_tree, tree_pids

# Three generations: root -> child -> grandchild, each recording its pid, all sleeping.
TREE = r'''
import os, subprocess, sys, time
pids, depth = sys.argv[1], int(sys.argv[2])
if depth > 1:
    subprocess.Popen([sys.executable, __file__, pids, str(depth - 1)])
tmp = os.path.join(pids, f"{depth}.tmp")
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.replace(tmp, os.path.join(pids, str(depth)))
while True:
    time.sleep(60)
'''


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    root = subprocess.Popen([sys.executable, str(script), str(pids_dir), "3"])
    files = [pids_dir / str(d) for d in (3, 2, 1)]
    try:
        wait_until(lambda: all(f.exists() for f in files), 10, "the tree to start")
        pids = [int(f.read_text()) for f in files]
        yield root, pids
    finally:
        for pid in alive([int(f.read_text()) for f in files if f.exists()]):
            try:
                if str(tmp_path) in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                pass
        root.kill()
        root.wait()


def test_tree_pids_lists_root_and_descendants(tree: tuple[subprocess.Popen[bytes], list[int]]) -> None:
    root, pids = tree
    found = tree_pids(root.pid)
    assert found[0] == root.pid
    assert sorted(found) == sorted(pids)


def test_kill_tree_kills_every_generation(tree: tuple[subprocess.Popen[bytes], list[int]]) -> None:
    root, pids = tree
    kill_tree(root.pid, signal.SIGKILL)
    root.wait(timeout=10)
    wait_until(lambda: alive(pids) == [], 5, "the tree to die")
    assert tree_pids(root.pid) == []


def test_gone_processes_are_harmless() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert alive(tree_pids(proc.pid)) == []  # the pid is free again (barring reuse by a stranger)
    kill_tree(proc.pid, signal.SIGTERM)  # must not raise
    assert alive([proc.pid]) == []


def test_alive_ignores_zombies() -> None:
    proc = subprocess.Popen(["true"])
    try:
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
        assert alive([proc.pid]) == []
        assert alive([os.getpid(), proc.pid]) == [os.getpid()]
    finally:
        proc.wait()


@pytest.mark.parametrize(
    ("code", "sig", "text"),
    [
        (0, None, "exited normally (code 0)"),
        (1, None, "exited with code 1"),
        (3, None, "exited with code 3"),
        (127, None, "command not found (exit code 127)"),
        (126, None, "command not executable (exit code 126)"),
        (137, None, "exited with code 137 (the code a shell gives a process killed by SIGKILL)"),
        (255, None, "exited with code 255"),
        (None, "SIGKILL", "killed by SIGKILL (out of memory? stopped by another program?)"),
        (None, "SIGTERM", "terminated by SIGTERM"),
        (None, "SIGSEGV", "segmentation fault (SIGSEGV)"),
        (None, "SIGABRT", "aborted (SIGABRT)"),
        (None, "SIGINT", "interrupted by SIGINT"),
        (None, "SIGUSR1", "killed by SIGUSR1"),
        (None, "kill", "killed by SIGKILL (out of memory? stopped by another program?)"),
        (None, "signal 99", "killed by signal 99"),
        (None, None, "ended with an unknown status"),
    ],
)
def test_describe_exit(code: int | None, sig: str | None, text: str) -> None:
    assert describe_exit(code, sig) == text


def test_signal_name() -> None:
    assert signal_name(9) == "SIGKILL"
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(11) == "SIGSEGV"
    assert signal_name(999) == "signal 999"


def test_find_orphans_by_marker_env() -> None:
    marker = f"GPUD_TEST_MARKER_{uuid.uuid4().hex}"
    value = "Qwen/Qwen2.5-7B-Instruct"
    env = {**os.environ, marker: value}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        wait_until(lambda: proc.pid in find_orphans(marker), 10, "the marked process")
        assert find_orphans(marker, value) == [proc.pid]
        assert find_orphans(marker, "other") == []
        assert find_orphans(marker + "_NOT") == []
    finally:
        proc.kill()
        proc.wait()
    assert find_orphans(marker) == []


def test_find_orphans_skips_ourselves() -> None:
    # PATH is in our own initial environment too; the caller is never one of its own orphans.
    assert os.getpid() not in find_orphans("PATH")
