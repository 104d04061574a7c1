"""The DATA phase, parsed in bulk: from raw bytes after ``354`` to one canonical message.

No Python call per line: the reader searches the stream for ``CRLF.CRLF`` with
``bytes.find`` over each new chunk, and the finished body is unstuffed, checked and
normalised with whole-buffer operations.

Only ``CRLF.CRLF`` ends DATA (RFC 5321 §4.1.1.4).  ``LF.LF``, ``CR.CR``, ``CRLF.LF`` and
``LF.CRLF`` are content, so a client cannot smuggle a second message through the
gateway.  Bare CR or LF in the content is either refused (``reject``) or turned into
CRLF (``normalize``); either way the canonical message has only CRLF line endings, and
the relay dot-stuffs every line that starts with ``.`` on the way out, including lines
that a normalisation created.  Over-long lines and oversized messages are read to the
end of DATA before the reply, so the body never falls back into command mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import reply as R
from gateway.reply import Reply

_END = b"\r\n.\r\n"
# How far past the size limit the raw (dot-stuffed) stream may grow before we stop
# keeping it; the exact limit is checked on the unstuffed message.
_RAW_SLACK = 1 << 20


@dataclass(frozen=True)
class Body:
    """A complete, canonical message (CRLF only, unstuffed, ends with CRLF or is empty)."""

    data: bytes
    is_8bit: bool
    normalized: bool  # bare CR/LF were converted


class BodyReader:
    """Collects one DATA phase.  ``feed`` until it returns the bytes after the terminator;
    then ``result()`` gives a ``Body`` or the ``Reply`` refusing it."""

    def __init__(self, max_size: int, max_line_length: int = 998,
                 bare_line_ending: str = "normalize") -> None:
        if bare_line_ending not in ("normalize", "reject"):
            raise ValueError(f"bare_line_ending must be normalize or reject, not {bare_line_ending!r}")
        self.max_size = max_size
        self.max_line_length = max_line_length
        self.bare_line_ending = bare_line_ending
        # A virtual CRLF in front lets an empty message (".\r\n" at once) match _END.
        self._window = bytearray(b"\r\n")
        self._overflow = False
        self._raw: bytes | None = None
        self.raw_size = 0  # bytes received in DATA (for logs and limits)

    @property
    def done(self) -> bool:
        return self._raw is not None

    def feed(self, data: bytes) -> bytes | None:
        """Add received bytes.  Returns None while DATA goes on; at the end, the bytes that
        followed the terminator (pipelined commands), possibly empty."""
        if self._raw is not None:
            raise RuntimeError("DATA already complete")
        start = max(0, len(self._window) - (len(_END) - 1))
        self._window += data
        self.raw_size += len(data)
        end = self._window.find(_END, start)
        if end < 0:
            if self._overflow or len(self._window) > self.max_size + _RAW_SLACK:
                # Too big: keep reading to the end of DATA, but stop keeping the content.
                self._overflow = True
                del self._window[: -(len(_END) - 1)]
            return None
        rest = bytes(self._window[end + len(_END):])
        self._raw = b"" if self._overflow else bytes(self._window[2:end + 2])
        self.raw_size -= len(rest)
        self._window = bytearray()
        return rest

    def result(self) -> Body | Reply:
        """The canonical message, or the reply that refuses it."""
        if self._raw is None:
            raise RuntimeError("DATA not complete")
        if self._overflow:
            return R.MESSAGE_TOO_BIG
        raw = self._raw
        # Undo the transparency procedure on CRLF-delimited lines (the SMTP framing).
        body = raw[1:] if raw.startswith(b".") else raw
        body = body.replace(b"\r\n.", b"\r\n")
        if len(body) > self.max_size:
            return R.MESSAGE_TOO_BIG
        crlf = body.count(b"\r\n")
        normalized = False
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
            if self.bare_line_ending == "reject":
                return R.BARE_LINEFEED
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            normalized = True
            if len(body) > self.max_size:
                return R.MESSAGE_TOO_BIG
        if body and max(map(len, body.split(b"\r\n"))) > self.max_line_length:
            return R.DATA_LINE_TOO_LONG
        return Body(body, is_8bit=not body.isascii(), normalized=normalized)
