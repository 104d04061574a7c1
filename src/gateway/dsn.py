"""Delivery status notifications: the bounce sent to a sender whose mail failed.

A multipart/report (RFC 6522, formerly 3462) with three parts: a human-readable
explanation, a message/delivery-status report (RFC 3464) and the original header block as
text/rfc822-headers (headers only, to keep bounces small).  The output is canonical CRLF,
7bit-safe, and no line is longer than 998 octets: the smarthost's reply text is untrusted
and may be long or contain any character, so it is sanitised, escaped and folded here.
"""

from __future__ import annotations

import binascii
import datetime
import os
import re
import textwrap
from collections.abc import Sequence
from email.utils import format_datetime

from gateway.delivery import Outcome, RecipientResult
from gateway.envelope import Envelope, new_queue_id

MAX_HEADERS = 64 * 1024  # of the original header block quoted in the bounce
FOLD_WIDTH = 78
MAX_LINE = 998
_ENHANCED_RE = re.compile(r"5\.\d{1,3}\.\d{1,3}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
EXPIRED_STATUS = "4.4.7"


def build_bounce(envelope: Envelope, message: bytes, failed: Sequence[RecipientResult], *,
                 reporting_mta: str, now: float, expired: bool = False) -> bytes:
    """The bounce for ``failed`` recipients of ``envelope``, addressed to its sender.

    A recipient counts as expired (Status 4.4.7, Action failed) when its result is a
    TEMPFAIL, or when ``expired`` is true and it is not a PERMFAIL.
    """
    boundary = _boundary(message)
    headers = _fold("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>")
    headers += _fold("To", f"<{envelope.sender}>")
    headers += _fold("Subject", "Undelivered Mail Returned to Sender")
    headers += _fold("Date", _date(now))
    headers += _fold("Message-ID", f"<{new_queue_id(now)}.bounce@{reporting_mta}>")
    headers += _fold("Auto-Submitted", "auto-replied")
    headers += _fold("MIME-Version", "1.0")
    headers += _fold("Content-Type", "multipart/report; report-type=delivery-status; "
                                     f'boundary="{boundary}"')
    lines = headers + ["", "This is a MIME-encapsulated message.", ""]
    for part in (_notification(envelope, failed, reporting_mta, now, expired),
                 _report(envelope, failed, reporting_mta, expired),
                 _original_headers(message)):
        lines += [f"--{boundary}", *part, ""]
    lines.append(f"--{boundary}--")
    out = "\r\n".join(lines) + "\r\n"
    return out.encode("ascii")


def _is_expiry(r: RecipientResult, expired: bool) -> bool:
    return r.outcome is Outcome.TEMPFAIL or (expired and r.outcome is not Outcome.PERMFAIL)


def _status(r: RecipientResult, expired: bool) -> str:
    if _is_expiry(r, expired):
        return EXPIRED_STATUS
    return r.enhanced if _ENHANCED_RE.match(r.enhanced) else "5.0.0"


# --- the three parts ---------------------------------------------------------------------
def _notification(envelope: Envelope, failed: Sequence[RecipientResult], mta: str,
                  now: float, expired: bool) -> list[str]:
    paragraphs = [_wrap(p) for p in (
        f"This is the mail system at host {mta}.",
        "I'm sorry to have to inform you that your message could not be delivered to one "
        "or more recipients. The headers of your message are attached below.",
        "For further assistance, please send mail to your postmaster. If you do so, "
        "please include this problem report.",
    )]
    age = _age(now - envelope.received_at)
    for r in failed:
        said = f"host {_host_name(r.host)} said: {r.describe()}" if r.host else r.describe()
        if _is_expiry(r, expired):
            said = (f"delivery was not possible for {age} and the message has expired; "
                    f"the last error was: {said}")
        paragraphs.append(_wrap(f"<{r.recipient}>: {said}", indent="    "))
    text = "\n\n".join(paragraphs)
    head = ["Content-Description: Notification"]
    if text.isascii():
        return head + ["Content-Type: text/plain; charset=us-ascii", "", *text.split("\n")]
    qp = binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii")
    return head + ["Content-Type: text/plain; charset=utf-8",
                   "Content-Transfer-Encoding: quoted-printable", "", *qp.split("\n")]


def _report(envelope: Envelope, failed: Sequence[RecipientResult], mta: str,
            expired: bool) -> list[str]:
    lines = ["Content-Description: Delivery report", "Content-Type: message/delivery-status", ""]
    lines += _fold("Reporting-MTA", f"dns; {mta}")
    lines += _fold("X-Gateway-Queue-ID", envelope.queue_id)
    lines += _fold("Arrival-Date", _date(envelope.received_at))
    for r in failed:
        lines.append("")
        lines += _fold("Final-Recipient", f"rfc822; {r.recipient}")
        lines += _fold("Action", "failed")
        lines += _fold("Status", _status(r, expired))
        if r.host:
            lines += _fold("Remote-MTA", f"dns; {_host_name(r.host)}")
        if r.code:
            lines += _fold("Diagnostic-Code", f"smtp; {_escape(r.describe())}")
        elif r.text:
            lines += _fold("Diagnostic-Code", f"X-Gateway; {_escape(r.text)}")
    return lines


def _original_headers(message: bytes) -> list[str]:
    block = _header_block(message)
    if len(block) > MAX_HEADERS:
        block = block[: block.rfind(b"\r\n", 0, MAX_HEADERS) + 2]
    # Canonical input has no bare CR/LF; still, never let one through as a line break.
    raw = [line.replace(b"\r", b" ").replace(b"\n", b" ") for line in block.split(b"\r\n")]
    while raw and not raw[-1]:
        raw.pop()
    head = ["Content-Description: Undelivered Message Headers",
            "Content-Type: text/rfc822-headers"]
    if all(line.isascii() and len(line) <= MAX_LINE for line in raw):
        return head + ["", *(line.decode("ascii") for line in raw)]
    qp = binascii.b2a_qp(b"\n".join(raw), istext=True).decode("ascii")
    return head + ["Content-Transfer-Encoding: quoted-printable", "", *qp.split("\n")]


def _header_block(message: bytes) -> bytes:
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


# --- small text helpers ------------------------------------------------------------------
def _fold(name: str, value: str) -> list[str]:
    """``Name: value`` folded at spaces to FOLD_WIDTH where possible, never past MAX_LINE."""
    words = [w for w in _clean(value).split(" ") if w]
    chunks = [w[i: i + MAX_LINE // 2] for w in words for i in range(0, len(w), MAX_LINE // 2)]
    lines = [f"{name}:"]
    for chunk in chunks:
        if len(lines[-1]) + 1 + len(chunk) > FOLD_WIDTH and lines[-1].strip() not in ("", f"{name}:"):
            lines.append("")
        lines[-1] += " " + chunk
    return lines


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(_clean(text), width=72, subsequent_indent=indent,
                         break_on_hyphens=False)


def _clean(text: str) -> str:
    """One line of text: control characters (CR, LF, TAB, ...) become single spaces."""
    return _CONTROL_RE.sub(" ", text).strip()


def _escape(text: str) -> str:
    """ASCII only: other characters as RFC 6533 ``\\x{HHHH}`` escapes."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):04X}}}" for ch in _clean(text))


def _host_name(host: str) -> str:
    """``smtp.example:465`` → ``smtp.example``; ``[::1]:25`` → ``::1``."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and name:
        host = name
    return host.strip("[]")


def _date(when: float) -> str:
    return format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))


def _age(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{max(seconds, 0) / 60:.0f} minutes"


def _boundary(message: bytes) -> str:
    while True:
        boundary = f"=_bounce_{os.urandom(12).hex()}"
        if boundary.encode() not in message:
            return boundary
