"""Log files: rotation boundaries, tail and follow across rotation, and safe paths for any model name."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.errors import InvalidInput
from gpud.supervise.logs import RotatingWriter, escape_name, follow, log_path, tail


def contents(path: Path) -> list[bytes]:
    """FILE.N … FILE.1, FILE: oldest first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [p.read_bytes() for p in [*files, path] if p.exists()]


def test_rotation_boundaries(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with RotatingWriter(log, max_bytes=10, backups=2) as w:
        w.write(b"12345\n")
        w.write(b"abcd\n")  # 11 bytes would not fit: rotate before, keep the line whole
        assert contents(log) == [b"12345\n", b"abcd\n"]
        w.write(b"efgh\n")  # exactly 10: no rotation
        assert contents(log) == [b"12345\n", b"abcd\nefgh\n"]
        w.write(b"x")
        assert contents(log) == [b"12345\n", b"abcd\nefgh\n", b"x"]
        w.write(b"y" * 9 + b"\n")  # oldest backup dropped
        assert contents(log) == [b"abcd\nefgh\n", b"x", b"y" * 9 + b"\n"]


def test_chunk_is_cut_at_last_newline_that_fits(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with RotatingWriter(log, max_bytes=10, backups=5) as w:
        w.write(b"aaa\nbbb\nccc\n")
    assert contents(log) == [b"aaa\nbbb\n", b"ccc\n"]


def test_line_longer_than_a_file_is_split(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with RotatingWriter(log, max_bytes=10, backups=5) as w:
        w.write(b"A" * 25 + b"\n")
    assert contents(log) == [b"A" * 10, b"A" * 10, b"A" * 5 + b"\n"]
    assert tail(log, 1) == ["A" * 25]


def test_no_backups_truncates(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with RotatingWriter(log, max_bytes=8, backups=0) as w:
        w.write(b"1234567\n")
        w.write(b"abc\n")
    assert contents(log) == [b"abc\n"]


def test_reopen_appends_and_counts_existing_size(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "r.log"
    with RotatingWriter(log, max_bytes=10, backups=1) as w:
        w.write(b"1234567\n")
    with RotatingWriter(log, max_bytes=10, backups=1) as w:
        w.write(b"abc\n")
    assert contents(log) == [b"1234567\n", b"abc\n"]


def test_invalid_writer_settings(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        RotatingWriter(tmp_path / "r.log", max_bytes=0)
    with pytest.raises(InvalidInput):
        RotatingWriter(tmp_path / "r.log", backups=-1)


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"")), max_size=30),
    max_bytes=st.integers(1, 30),
)
def test_rotation_keeps_the_stream(chunks: list[bytes], max_bytes: int) -> None:
    # With room for every byte, the files oldest-first are exactly what was written, none too big.
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "r.log"
        with RotatingWriter(log, max_bytes=max_bytes, backups=2000) as w:
            for chunk in chunks:
                w.write(chunk)
        parts = contents(log)
        assert b"".join(parts) == b"".join(chunks)
        assert all(len(p) <= max_bytes for p in parts)
        lines = b"".join(chunks).decode(errors="replace").split("\n")
        if lines[-1] == "":
            lines.pop()
        assert tail(log, 5) == lines[-5:]


def test_tail_across_rotation(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    with RotatingWriter(log, max_bytes=100, backups=50) as w:
        for i in range(200):
            w.write(f"line {i}\n".encode())
    assert tail(log, 30) == [f"line {i}" for i in range(170, 200)]
    assert tail(log, 1) == ["line 199"]
    assert tail(log, 0) == []
    assert len(tail(log, 10_000)) == 200


def test_tail_big_file_and_partial_last_line(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    body = "".join(f"{i:06d} {'z' * 200}\n" for i in range(2000)) + "no newline yet"
    log.write_text(body)
    last = tail(log, 3)
    assert last[0].startswith("001998 ") and last[1].startswith("001999 ") and last[2] == "no newline yet"


def test_tail_missing_file(tmp_path: Path) -> None:
    assert tail(tmp_path / "nothing.log", 10) == []


async def next_line(it: AsyncIterator[str]) -> str:
    return await asyncio.wait_for(it.__anext__(), timeout=5)


def test_follow_appends_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "r.log"

    async def scenario() -> None:
        with RotatingWriter(log, max_bytes=40, backups=2) as w:
            for i in range(5):
                w.write(f"old {i}\n".encode())
            async with aclosing(follow(log, from_lines=2, poll_interval=0.01)) as it:
                assert [await next_line(it), await next_line(it)] == ["old 3", "old 4"]
                w.write(b"new 0\n")
                assert await next_line(it) == "new 0"
                w.write(b"half a ")  # held until its newline arrives
                w.write(b"line\n")
                assert await next_line(it) == "half a line"
                for i in range(1, 6):  # several rotations at 40 bytes per file
                    w.write(f"rotated {i:02d} {'r' * 20}\n".encode())
                    assert await next_line(it) == f"rotated {i:02d} {'r' * 20}"

    asyncio.run(scenario())


def test_follow_truncation_and_late_file(tmp_path: Path) -> None:
    log = tmp_path / "late.log"

    async def scenario() -> None:
        async with aclosing(follow(log, from_lines=10, poll_interval=0.01)) as it:
            waiting = asyncio.ensure_future(next_line(it))
            await asyncio.sleep(0.05)  # likely lets follow poll a missing file first; passes either way
            log.write_text("first\nsecond\n")
            assert await waiting == "first"
            assert await next_line(it) == "second"
            os.truncate(log, 0)  # then shorter than what follow has read: it starts over at 0
            with open(log, "a") as f:
                f.write("after\n")
            assert await next_line(it) == "after"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "..", ".", "Qwen/Qwen2.5-7B-Instruct", "x:y", "/etc/passwd", "a" * 128, "%2F"]
)
def test_log_path_never_escapes(tmp_path: Path, name: str) -> None:
    path = log_path(tmp_path, name, 2)
    assert path.name == "replica-2.log"
    assert path.parent.parent == tmp_path / "logs"
    escaped = path.parent.name
    assert "/" not in escaped and escaped not in (".", "..") and not escaped.startswith(".")
    assert len(escaped.encode()) <= 255
    assert path.resolve().is_relative_to((tmp_path / "logs").resolve())


def test_log_path_is_injective_and_stable(tmp_path: Path) -> None:
    names = ["a/b", "a%2Fb", "a_b", "a-b", "A/B", "a.b", "a" * 128, "a" * 127 + "b"]
    escaped = {escape_name(n) for n in names}
    assert len(escaped) == len(names)
    assert escape_name("Qwen/Qwen2.5-7B-Instruct").startswith("Qwen%2FQwen2%2E5-7B-Instruct.")
    assert log_path(tmp_path, "m", 0) == log_path(tmp_path, "m", 0)


def test_log_path_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        log_path(tmp_path, "", 0)
    with pytest.raises(InvalidInput):
        log_path(tmp_path, "m", -1)
