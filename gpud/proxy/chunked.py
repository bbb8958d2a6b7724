"""Where a chunked body ends, found without copying it (RFC 9112 §7.1). Pure: bytes in, offsets out.

The proxy relays a replica's chunked body as the bytes it sent; this scanner only walks the framing so the
proxy knows where the body ends (so that nothing past it reaches the client), whether it sits between two
chunks (the cut rule of the proxy: an SSE error event may only go between chunks), and, for a client that
cannot take chunked encoding, what the data is.
"""

from __future__ import annotations

import enum

MAX_LINE = 8192  # a chunk-size or trailer line longer than this is not a framing we accept


class Malformed(ValueError):
    """The chunked framing is broken."""


class _State(enum.Enum):
    SIZE = 0  # reading a chunk-size line
    DATA = 1  # inside a chunk's data
    DATA_END = 2  # expecting the CRLF after a chunk's data
    TRAILER = 3  # reading trailer lines after the last chunk
    DONE = 4


class ChunkScanner:
    __slots__ = ("_state", "_remaining", "_line", "decoded")

    def __init__(self, decode: bool = False) -> None:
        self._state = _State.SIZE
        self._remaining = 0
        self._line = b""
        self.decoded: list[bytes] | None = [] if decode else None  # with decode: data pieces, taken by caller

    @property
    def between_chunks(self) -> bool:
        """True when the bytes so far end exactly after a whole chunk (or at the start)."""
        return self._state is _State.SIZE and not self._line

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes) -> int:
        """Walk `data`; returns how many of its bytes belong to the body (all of them, unless the body ended
        inside `data`). Raises Malformed for broken framing, and for any byte fed after the end."""
        if self._state is _State.DONE:
            if data:
                raise Malformed("bytes after the end of the body")
            return 0
        pos, end = 0, len(data)
        decoded = self.decoded
        while pos < end:
            state = self._state
            if state is _State.DATA:
                take = min(self._remaining, end - pos)
                if decoded is not None:
                    decoded.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _State.DATA_END
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    raise Malformed("a chunk-size or trailer line over 8 KiB")
                return end
            line = (self._line + data[pos:eol]) if self._line else data[pos:eol]
            self._line = b""
            pos = eol + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state is _State.SIZE:
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise Malformed("an invalid chunk size")
                self._remaining = int(size, 16)
                self._state = _State.DATA if self._remaining else _State.TRAILER
            elif state is _State.DATA_END:
                if line:
                    raise Malformed("a chunk without its closing CRLF")
                self._state = _State.SIZE
            elif not line:  # TRAILER: an empty line ends the body (trailer fields are dropped)
                self._state = _State.DONE
                return pos
        return end
