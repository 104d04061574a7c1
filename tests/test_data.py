"""DATA phase in bulk: terminator, transparency, limits, bare CR/LF, smuggling probes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import reply as R
from gateway.data import Body, BodyReader


def read(stream: bytes, chunks: int = 1, **kw) -> tuple[Body | R.Reply, bytes]:
    reader = BodyReader(kw.pop("max_size", 10_000_000), **kw)
    size = max(1, len(stream) // chunks)
    rest = None
    for i in range(0, len(stream), size):
        assert rest is None, "reader finished before the stream did"
        rest = reader.feed(stream[i:i + size])
        if rest is not None:
            # Bytes after the terminator within this chunk plus the remaining chunks.
            rest = rest + stream[i + size:]
            break
    assert rest is not None, "terminator not found"
    return reader.result(), rest


def test_simple_message_and_pipelined_rest():
    body, rest = read(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert body == Body(b"Subject: x\r\n\r\nhello\r\n", is_8bit=False, normalized=False)
    assert rest == b"QUIT\r\n"


def test_empty_message():
    body, rest = read(b".\r\n")
    assert isinstance(body, Body) and body.data == b""
    assert rest == b""


@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 1000])
def test_terminator_split_across_chunks(chunks):
    stream = b"a\r\n..b\r\n.c\r\n" + b"x" * 50 + b"\r\n.\r\nNOOP\r\n"
    body, rest = read(stream, chunks=chunks)
    assert body.data == b"a\r\n.b\r\nc\r\n" + b"x" * 50 + b"\r\n"
    assert rest == b"NOOP\r\n"


def test_first_line_dot_is_unstuffed():
    body, _ = read(b"..leading\r\n.\r\n")
    assert body.data == b".leading\r\n"


@pytest.mark.parametrize("probe,canonical", [
    (b"\n.\n", b"one\r\n.\r\nMAIL"),
    (b"\r.\r", b"one\r\n.\r\nMAIL"),
    (b"\r\n.\n", b"one\r\n\r\nMAIL"),  # ".\nMAIL" is a CRLF line whose stuffing dot goes
    (b"\n.\r\n", b"one\r\n.\r\nMAIL"),
])
def test_smuggling_probes_do_not_end_data(probe, canonical):
    stream = b"one" + probe + b"MAIL FROM:<evil@x.test>\r\n" + b"\r\n.\r\n"
    reader = BodyReader(10_000, bare_line_ending="normalize")
    rest = reader.feed(stream)
    assert rest == b"", "only CRLF.CRLF may end DATA"
    body = reader.result()
    assert isinstance(body, Body) and body.normalized
    # One message, CRLF only; a lone-dot line is content that the relay stuffs on the way out.
    assert body.data == canonical + b" FROM:<evil@x.test>\r\n\r\n"


@pytest.mark.parametrize("probe", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"a\nb"])
def test_bare_line_endings_rejected_by_policy(probe):
    body, _ = read(b"x" + probe + b"y\r\n.\r\n", bare_line_ending="reject")
    assert body == R.BARE_LINEFEED


def test_normalize_converts_bare_lf_and_cr():
    body, _ = read(b"a\nb\rc\r\nd\r\n.\r\n")
    assert body.data == b"a\r\nb\r\nc\r\nd\r\n"
    assert body.normalized


def test_line_length_limit_reads_to_end():
    stream = b"x" * 999 + b"\r\nMAIL FROM:<a@b.test>\r\n.\r\nRSET\r\n"
    body, rest = read(stream, chunks=5)
    assert body == R.DATA_LINE_TOO_LONG
    assert rest == b"RSET\r\n"
    ok, _ = read(b"x" * 998 + b"\r\n.\r\n")
    assert isinstance(ok, Body)


def test_stuffed_dot_does_not_count_towards_line_length():
    ok, _ = read(b"." + b"." * 998 + b"\r\n.\r\n")
    assert isinstance(ok, Body) and len(ok.data) == 1000


def test_size_limit_exact_and_over():
    ok, _ = read(b"x" * 98 + b"\r\n.\r\n", max_size=100)
    assert isinstance(ok, Body)
    big, _ = read(b"x" * 99 + b"\r\n.\r\n", max_size=100)
    assert big == R.MESSAGE_TOO_BIG


def test_huge_message_is_discarded_but_read_to_end():
    reader = BodyReader(1000)
    line = b"y" * 500 + b"\r\n"
    for _ in range(5000):  # 2.5 MB, well past max + slack
        assert reader.feed(line) is None
    assert len(reader._window) < 10  # not kept in memory
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert reader.result() == R.MESSAGE_TOO_BIG


def test_8bit_detected():
    body, _ = read("héllo\r\n".encode() + b".\r\n")
    assert body.is_8bit


@given(st.lists(st.sampled_from([b"", b".", b"..", b".x", b"abc", b"x.y", b" ."]), max_size=20),
       st.integers(min_value=1, max_value=9))
def test_stuff_unstuff_roundtrip(lines, chunks):
    """What a correct client stuffs, the reader gives back exactly, however it is split."""
    canonical = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    body, rest = read(stuffed + b".\r\n", chunks=chunks)
    assert body.data == canonical
    assert rest == b""
