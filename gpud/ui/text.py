"""Log text for the page: bytes from the daemon cut into whole lines of bounded length. Pure."""

from __future__ import annotations


class LineSplitter:
    """Feed it chunks of a byte stream; get back the complete lines, each at most `limit` characters.

    A line longer than that keeps its first `limit` characters and says how many bytes were left out;
    the rest of it is never held in memory, so one runaway line (a progress bar without newlines, a
    binary dump) costs a bounded amount however long it grows.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._head = bytearray()   # the start of the current line, at most `limit * 4` bytes (UTF-8)
        self._dropped = 0          # bytes of the current line beyond that

    def _line(self) -> str:
        text = self._head.decode("utf-8", "replace").rstrip("\r")
        cut = 0
        if len(text) > self.limit:
            cut = len(text[self.limit:].encode("utf-8", "replace"))
            text = text[:self.limit]
        cut += self._dropped
        self._head.clear()
        self._dropped = 0
        return text if not cut else f"{text} … [{cut} more bytes]"

    def _keep(self, data: bytes | memoryview) -> None:
        room = max(0, self.limit * 4 - len(self._head))
        self._head += data[:room]
        self._dropped += max(0, len(data) - room)

    def feed(self, chunk: bytes) -> list[str]:
        """The lines that `chunk` completes (without their line endings)."""
        lines: list[str] = []
        view = memoryview(chunk)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._keep(view[start:])
                return lines
            self._keep(view[start:end])
            lines.append(self._line())
            start = end + 1

    def flush(self) -> list[str]:
        """The last line when the stream ended without a newline."""
        if not self._head and not self._dropped:
            return []
        return [self._line()]
