"""gpud.proxy.chunked: the end of a chunked body, found at every split of the bytes (pure, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.proxy.chunked import ChunkScanner, Malformed


def frame(chunks: list[bytes], trailer: bytes = b"", extension: bool = False) -> bytes:
    ext = b";x=1" if extension else b""
    return b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c) + b"0\r\n" + trailer + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    trailer=st.sampled_from([b"", b"X-T: 1\r\n"]),
    extension=st.booleans(),
    after=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
)
def test_the_end_is_found_and_the_data_decoded_at_any_split(
    chunks: list[bytes], trailer: bytes, extension: bool, after: bytes, cuts: list[int]
) -> None:
    body = frame(chunks, trailer, extension)
    raw = body + after
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    scanner = ChunkScanner(decode=True)
    relayed = b""
    for start, stop in zip(points, points[1:], strict=False):
        piece = raw[start:stop]
        if scanner.done:
            with pytest.raises(Malformed):
                scanner.feed(piece)
            break
        used = scanner.feed(piece)
        relayed += piece[:used]
    assert scanner.done and relayed == body
    assert b"".join(scanner.decoded or []) == b"".join(chunks)


def test_between_chunks_tells_where_an_event_may_go() -> None:
    scanner = ChunkScanner()
    assert scanner.between_chunks
    scanner.feed(b"9\r\ndata: a\n")
    assert not scanner.between_chunks
    scanner.feed(b"\n\r")
    assert not scanner.between_chunks
    scanner.feed(b"\n")
    assert scanner.between_chunks


@pytest.mark.parametrize("raw", [b"zz\r\n", b"0x5\r\nhello\r\n", b"5\r\nhelloXX\r\n", b"\r\n", b"1" * 17 + b"\r\n"])
def test_broken_framing_is_malformed(raw: bytes) -> None:
    with pytest.raises(Malformed):
        ChunkScanner().feed(raw)
