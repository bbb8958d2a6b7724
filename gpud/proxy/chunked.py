"""Where a chunked body ends, found without copying it (RFC 9112 §7.1). Pure: bytes in, offsets out.

The proxy relays a replica's chunked body as the bytes it sent; this scanner only walks the framing so the
proxy knows where the body ends (so that nothing past it reaches the client), whether it sits between two
chunks (the cut rule of the proxy: an SSE error event may only go between chunks), and, for a client that
cannot take chunked encoding, what the data is.

It runs once per read of every stream (one token, usually one chunk), so the common case — reads that hold
whole chunks — takes a fast path of a few C-level calls per chunk; anything split across reads goes through
the general state machine.
"""

from __future__ import annotations

import re

MAX_LINE = 8192  # a chunk-size or trailer line longer than this is not a framing we accept
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

# States (plain ints: this is the proxy's per-token path).
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = 0, 1, 2, 3, 4


class Malformed(ValueError):
    """The chunked framing is broken."""


class ChunkScanner:
    __slots__ = ("_state", "_remaining", "_line", "decoded")

    def __init__(self, decode: bool = False) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self.decoded: list[bytes] | None = [] if decode else None  # with decode: data pieces, taken by caller

    @property
    def between_chunks(self) -> bool:
        """True when the bytes so far end exactly after a whole chunk (or at the start)."""
        return self._state == _SIZE and not self._line

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> int:
        """Walk `data`; returns how many of its bytes belong to the body (all of them, unless the body ended
        inside `data`). Raises Malformed for broken framing, and for any byte fed after the end."""
        state = self._state
        if state == _DONE:
            if data:
                raise Malformed("bytes after the end of the body")
            return 0
        pos, end = 0, len(data)
        decoded = self.decoded
        if state == _SIZE and not self._line:  # the fast path: whole "SIZE\r\nDATA\r\n" chunks
            find, match = data.find, _HEX.fullmatch
            while True:
                eol = find(b"\r\n", pos)
                if eol < 0 or not match(data, pos, eol):
                    break  # split, an extension, or malformed: the general path decides
                size = int(data[pos:eol], 16)
                stop = eol + 2 + size
                if size == 0 or stop + 2 > end or data[stop : stop + 2] != b"\r\n":
                    break
                if decoded is not None:
                    decoded.append(data[eol + 2 : stop])
                pos = stop + 2
                if pos == end:
                    return end
        while pos < end:
            if state == _DATA:
                take = min(self._remaining, end - pos)
                if decoded is not None:
                    decoded.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _DATA_END
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._line += data[pos:]
                if len(self._line) > MAX_LINE:
                    raise Malformed("a chunk-size or trailer line over 8 KiB")
                self._state = state
                return end
            line = (self._line + data[pos:eol]) if self._line else data[pos:eol]
            self._line = b""
            pos = eol + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == _SIZE:
                size_text = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_text):
                    raise Malformed("an invalid chunk size")
                self._remaining = int(size_text, 16)
                state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_END:
                if line:
                    raise Malformed("a chunk without its closing CRLF")
                state = _SIZE
            elif not line:  # _TRAILER: an empty line ends the body (trailer fields are dropped)
                self._state = _DONE
                return pos
        self._state = state
        return end
