"""Per-replica log files: where they live, a size-rotating writer, and tail/follow readers.

A replica's log is one logical byte stream spread over FILE.N … FILE.1, FILE (oldest first). The
writer appends to FILE and, when the next chunk would push it past ``max_bytes``, shifts the backups
up by one (dropping the oldest) and starts a fresh FILE. Readers treat the files as that one stream,
so a line cut in two by a rotation is read back whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

from gpud.errors import InvalidInput

if TYPE_CHECKING:  # the shim imports this module for RotatingWriter: it starts faster without asyncio
    import asyncio

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3

# Characters kept as they are in a directory name; everything else (including "." and "/") is
# percent-encoded, so no model name can produce "..", a separator or a hidden file.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# NAME_MAX is 255 bytes on Linux; a 128-character name can encode to 384, so long ones are cut and
# told apart by the hash that every escaped name carries anyway.
_MAX_ESCAPED = 200
_READ_BLOCK = 64 * 1024


def backup_path(path: Path, index: int) -> Path:
    """FILE.index (index >= 1); index 0 is FILE itself."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


class RotatingWriter:
    """Append bytes to FILE, rotating to FILE.1..FILE.backups when FILE would exceed max_bytes.

    No file grows past ``max_bytes``. A rotation happens at the last newline that still fits, so
    lines stay whole in one file unless a single line is longer than ``max_bytes``. Writes are
    unbuffered (one ``write(2)`` per chunk) so that a follower sees output as soon as it is written.
    """

    def __init__(
        self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        if max_bytes < 1:
            raise InvalidInput(f"The log size limit must be at least 1 byte, not {max_bytes}.")
        if backups < 0:
            raise InvalidInput(f"The number of log backups cannot be negative ({backups}).")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        # Close before renaming: once a reader sees a new FILE, the old one never changes again.
        os.close(self._fd)
        self._fd = -1
        if self.backups == 0:
            os.truncate(self.path, 0)
        else:
            # Shift only the backups that exist (they are contiguous), so a rotation costs as many
            # renames as there are files; the oldest is overwritten once all slots are full.
            top = 0
            while top < self.backups - 1 and backup_path(self.path, top + 1).exists():
                top += 1
            for i in range(top, -1, -1):
                try:
                    os.replace(backup_path(self.path, i), backup_path(self.path, i + 1))
                except FileNotFoundError:
                    pass  # someone removed a file meanwhile; nothing to keep there
        self._open()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def write(self, data: bytes) -> None:
        """Append data, rotating as often as needed (a chunk may span several files)."""
        if self._fd < 0:
            raise ValueError("write to a closed RotatingWriter")
        while data:
            room = self.max_bytes - self._size
            if len(data) <= room:
                self._write_all(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0:
                if self._size > 0:
                    self._rotate()
                    continue
                cut = room  # one line longer than a whole file: split it
            self._write_all(data[:cut])
            data = data[cut:]
            self._rotate()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RotatingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def escape_name(model: str) -> str:
    """A directory name for a model name: percent-encoded, plus a short hash; never '.', '..' or '/'."""
    if not model:
        raise InvalidInput("A model name cannot be empty.")
    escaped = "".join(
        c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in model
    )
    digest = hashlib.sha256(model.encode("utf-8")).hexdigest()[:10]
    # "." never occurs in the escaped part, so the separator is unambiguous.
    return f"{escaped[:_MAX_ESCAPED]}.{digest}"


def log_path(state_dir: str | Path, model: str, replica: int) -> Path:
    """STATE_DIR/logs/<escaped model>/replica-<i>.log"""
    if isinstance(replica, bool) or not isinstance(replica, int) or replica < 0:
        raise InvalidInput(f"A replica index must be a non-negative integer, not {replica!r}.")
    return Path(state_dir) / "logs" / escape_name(model) / f"replica-{replica}.log"


def _stream_files(path: Path) -> list[Path]:
    """FILE, FILE.1, FILE.2 … newest first, as far as they exist without a gap."""
    files = [path]
    i = 1
    while backup_path(path, i).exists():
        files.append(backup_path(path, i))
        i += 1
    return files


def _read_back(fd: int, end: int, chunks: list[bytes], need_newlines: int, have: int) -> int:
    """Read fd backwards from end in blocks, prepending to chunks until have > need_newlines."""
    pos = end
    while pos > 0 and have <= need_newlines:
        start = max(0, pos - _READ_BLOCK)
        block = os.pread(fd, pos - start, start)
        if not block:
            break
        chunks.insert(0, block)
        have += block.count(b"\n")
        pos = start
    return have


def _tail_bytes(path: Path, lines: int, current_fd: int | None = None, current_end: int | None = None) -> bytes:
    """The end of the logical stream holding at least the last `lines` lines (or all of it).

    With current_fd/current_end the newest part is read from that open file up to that offset, so
    that follow() starts exactly where its reading position begins.
    """
    chunks: list[bytes] = []
    have = 0
    for index, file in enumerate(_stream_files(path)):
        if have > lines:
            break
        if index == 0 and current_fd is not None:
            have = _read_back(current_fd, current_end or 0, chunks, lines, have)
            continue
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # rotated away between listing and opening
        try:
            have = _read_back(fd, os.fstat(fd).st_size, chunks, lines, have)
        finally:
            os.close(fd)
    return b"".join(chunks)


def _split_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of the log, across rotated files, without their newlines."""
    if lines <= 0:
        return []
    return _split_lines(_tail_bytes(Path(path), lines))[-lines:]


async def follow(
    path: Path, *, from_lines: int, poll_interval: float = 0.2, until: asyncio.Event | None = None
) -> AsyncGenerator[str, None]:
    """Yield the last `from_lines` lines, then each new complete line as it is appended, until `until` is set.

    Survives rotation (FILE replaced: the old file is read to its end first) and truncation. Waits
    for the file if it does not exist yet. Output that several rotations overtake within one poll
    interval is skipped. Close it with contextlib.aclosing() so the file is closed promptly.
    """
    import asyncio  # here, not at the top: see the import block

    path = Path(path)
    fd = -1
    ino = -1
    pos = 0
    pending = b""  # a trailing partial line, held until its newline arrives

    def open_current() -> bool:
        nonlocal fd, ino, pos
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        ino = os.fstat(fd).st_ino
        pos = 0
        return True

    def read_new() -> bytes:
        nonlocal pos
        out: list[bytes] = []
        while True:
            block = os.pread(fd, 1024 * 1024, pos)
            if not block:
                return b"".join(out)
            out.append(block)
            pos += len(block)

    def emit(data: bytes) -> list[str]:
        nonlocal pending
        data = pending + data
        cut = data.rfind(b"\n") + 1
        pending = data[cut:]
        return _split_lines(data[:cut])

    try:
        if open_current():
            pos = os.fstat(fd).st_size
            if from_lines > 0:
                start = _tail_bytes(path, from_lines, fd, pos)
                for line in emit(start)[-from_lines:]:
                    yield line
        while True:
            if fd >= 0:
                for line in emit(read_new()):
                    yield line
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = None  # mid-rotation: keep the old file until a new one appears
                if st is not None and st.st_ino != ino:
                    for line in emit(read_new()):  # the writer closed it before the rename
                        yield line
                    os.close(fd)
                    fd = -1
                    if open_current():
                        continue
                elif st is not None and st.st_size < pos:
                    pos = 0  # truncated in place
                    pending = b""
                    continue
            elif open_current():
                continue
            if until is not None and until.is_set():
                return
            await asyncio.sleep(poll_interval)
    finally:
        if fd >= 0:
            os.close(fd)
