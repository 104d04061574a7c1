"""Message headers: the gateway's Received header, and reading the header block.

The message itself is opaque to the gateway except for its header block, which policy
reads (From: ownership; X-Header controls in a later stage).
"""

from __future__ import annotations

import email.utils
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
_COMMENT_UNSAFE = re.compile(r"[^\x20-\x7e]|[()\\]")


def header_block(body: bytes) -> bytes:
    """The header section of a canonical message, including its final CRLF."""
    if body.startswith(b"\r\n"):
        return b""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def parse_headers(block: bytes):
    """An ``email.message.Message`` holding only the headers (compat32: lenient, lossless)."""
    return BytesHeaderParser(policy=compat32).parsebytes(block)


def from_addresses(headers) -> list[str] | None:
    """Addresses in the From: header(s); None when there is no From: header at all."""
    values = headers.get_all("From")
    if values is None:
        return None
    return [addr for _name, addr in email.utils.getaddresses([str(v) for v in values])]


def sanitize(text: str, limit: int = 64) -> str:
    """Client-chosen text (HELO name) made safe for a header comment."""
    cleaned = _UNSAFE.sub("?", text)[:limit]
    return cleaned or "unknown"


def received_header(*, helo: str | None, client_ip: str, hostname: str, protocol: str,
                    queue_id: str, tls: str | None, recipients: list[str], when: float) -> bytes:
    """One Received header per transaction (RFC 5321 §4.4, RFC 3848 protocol names).

    ``for <rcpt>`` is added only for a single recipient, so the header never lists the
    other (possibly Bcc) recipients of a message.
    """
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [f"Received: from {sanitize(helo or 'unknown')} ([{ip}])"]
    lines.append(f"\tby {hostname} (itpison-gateway) with {protocol} id {queue_id}")
    if tls:
        lines.append(f"\t({_COMMENT_UNSAFE.sub('?', tls)[:120]})")
    date = email.utils.formatdate(when, localtime=False, usegmt=True)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")
