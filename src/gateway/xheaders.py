"""The eleven ITPison control headers (guide §7.1): their syntax, values and wire form.

Each header has a ``HeaderSpec`` (name, config key, kind).  ``parse_value`` turns the
header text into a typed value or raises ``BadValue`` with the reason the client sees:

=====================  ==========  ======================================================
header                 kind        accepted
=====================  ==========  ======================================================
X-JobName              text        printable ASCII (RFC 2047 encoded-words allowed), no
                                   ``< > " \\ ;`` or backquote, 1..job_name_max_length
X-RefNumber            ref         letters, digits and ``- _ . : / # + @ =``,
                                   1..ref_number_max_length
X-NextLaunchTime       time        see ``parse_time``
X-LaunchExpireTime     time        see ``parse_time``
X-LaunchType           integer     decimal 0..2147483647 (the guide lists no values)
X-LaunchClass          integer     decimal 0..2147483647 (the guide lists no values)
X-LaunchOption         flags       decimal 0..4294967295, or option names joined by
X-JobOption                        ``|``, ``,``, ``+`` or blanks (``NotTrackOpen|64``);
X-ListOption                       always sent as the decimal number
X-LinkOption
X-SendOption           value       0..4 (or its name) inside mask 15; higher bits unknown
=====================  ==========  ======================================================

Times (the guide names no format, so the gateway defines one): RFC 5322 date-time
(``Fri, 04 Dec 2026 09:00:00 +0800``) or ISO 8601 / RFC 3339 with ``T`` or a blank
(``2026-12-04T09:00:00+08:00``, ``...Z``, seconds and fraction optional).  A time without
zone (``2026-12-04 09:00``, ``2026/12/04 09:00:00``, RFC 5322 ``-0000``) is taken in
``options.local_time_zone``, or refused when that is unset.  Times are sent in one
normalised form (``options.time_format``).

This module also reads and rewrites the raw header block, byte for byte, so that every
other header reaches the smarthost exactly as the client sent it.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo

from gateway import options as O

INT32_MAX = 0x7FFFFFFF


@dataclass(frozen=True, eq=False)  # one instance per header: identity hash, cheap
class HeaderSpec:
    name: str  # X-LinkOption
    key: str  # link_option (config)
    kind: str  # "text" | "ref" | "time" | "integer" | "flags" | "value"
    family: O.FlagFamily | O.ValueFamily | None = None

    @property
    def bitwise(self) -> bool:
        return self.kind == "flags"


HEADERS: tuple[HeaderSpec, ...] = (
    HeaderSpec("X-JobName", "job_name", "text"),
    HeaderSpec("X-RefNumber", "ref_number", "ref"),
    HeaderSpec("X-NextLaunchTime", "next_launch_time", "time"),
    HeaderSpec("X-LaunchExpireTime", "launch_expire_time", "time"),
    HeaderSpec("X-LaunchType", "launch_type", "integer"),
    HeaderSpec("X-LaunchClass", "launch_class", "integer"),
    HeaderSpec("X-LaunchOption", "launch_option", "flags", O.LAUNCH_OPTION),
    HeaderSpec("X-JobOption", "job_option", "flags", O.JOB_OPTION),
    HeaderSpec("X-ListOption", "list_option", "flags", O.LIST_OPTION),
    HeaderSpec("X-LinkOption", "link_option", "flags", O.LINK_OPTION),
    HeaderSpec("X-SendOption", "send_option", "value", O.SEND_OPTION),
)
BY_NAME = {h.name.lower(): h for h in HEADERS}
BY_KEY = {h.key: h for h in HEADERS}


def spec(name_or_key: str) -> HeaderSpec:
    """A header by its name (any case) or config key; KeyError if it is none of the eleven."""
    text = name_or_key.strip()
    found = BY_NAME.get(text.lower()) or BY_KEY.get(text.lower())
    if found is None:
        raise KeyError(f"{name_or_key!r} is not an ITPison control header; known: "
                       + ", ".join(h.name for h in HEADERS))
    return found


class BadValue(ValueError):
    """A header value that can't be accepted; ``str(e)`` is the reason for the client."""


_NUMBER = re.compile(r"\d{1,10}\Z")
_TEXT_BAD = re.compile(r'[^\x20-\x7e]|[<>"\\;`]')
_REF_OK = re.compile(r"[A-Za-z0-9_.:/#+@=-]+\Z")
_ISO = re.compile(r"(\d{4})[-/](\d{2})[-/](\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
                  r"\s*(Z|[+-]\d{2}:?\d{2})?\Z", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What the value checks need from ``[options]``."""

    job_name_max_length: int = 128
    ref_number_max_length: int = 64
    local_time_zone: tzinfo | None = None
    time_format: str = "iso8601"


def parse_number(text: str, high: int = O.UINT32_MAX) -> int:
    text = text.strip()
    if not _NUMBER.match(text) or int(text) > high:
        raise BadValue(f"not a number 0..{high}: {_show(text)}")
    return int(text)


def parse_flags(family: O.FlagFamily, text: str) -> int:
    try:
        return family.parse(text)
    except ValueError as e:
        raise BadValue(str(e)) from None


def parse_send_option(text: str) -> int:
    """SendOption as a whole number (value in the low 4 bits, any higher bits kept)."""
    text = text.strip()
    value = parse_number(text) if text.isdigit() else _send_name(text)
    if value & O.SEND_LIST_MASK > 4:
        raise BadValue(f"SendOption {value & O.SEND_LIST_MASK} is out of range 0..4 "
                       "(SendMainListOnly..SendBothList)")
    return value


def _send_name(text: str) -> int:
    try:
        return O.SEND_OPTION.lookup(text).value
    except ValueError as e:
        raise BadValue(str(e)) from None


def parse_text(text: str, limit: int) -> str:
    text = text.strip()
    if not text:
        raise BadValue("empty value")
    if _TEXT_BAD.search(text):
        raise BadValue('only printable ASCII without < > " \\ ; ` (use an RFC 2047'
                       " encoded-word for other characters)")
    if len(text) > limit:
        raise BadValue(f"longer than {limit} characters")
    if "=?" in text:
        try:
            decoded = str(email.header.make_header(email.header.decode_header(text)))
        except (ValueError, LookupError, email.errors.HeaderParseError):
            raise BadValue("malformed RFC 2047 encoded-word") from None
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in decoded):
            raise BadValue("control characters in the encoded-word")
    return text


def parse_ref(text: str, limit: int) -> str:
    text = text.strip()
    if not text:
        raise BadValue("empty value")
    if not _REF_OK.match(text):
        raise BadValue("only letters, digits and - _ . : / # + @ = are allowed")
    if len(text) > limit:
        raise BadValue(f"longer than {limit} characters")
    return text


def parse_time(text: str, zone: tzinfo | None) -> datetime:
    """An aware datetime from RFC 5322 or ISO 8601 text (see the module docstring)."""
    text = text.strip()
    when = _iso_time(text) if _ISO.match(text) else _rfc5322_time(text)
    if when.tzinfo is None:
        if zone is None:
            raise BadValue(f"time without a time zone: {_show(text)} (add an offset such as"
                           " +08:00 or Z)")
        when = when.replace(tzinfo=zone)
    return when


def _iso_time(text: str) -> datetime:
    m = _ISO.match(text)
    assert m is not None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        when = datetime(int(year), int(month), int(day), int(hour), int(minute),
                        int(second or 0), micro)
        if zone is None:
            return when
        if zone.upper() == "Z":
            return when.replace(tzinfo=UTC)
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        if offset >= timedelta(hours=24) or int(digits[2:]) >= 60:
            raise ValueError("bad offset")
        return when.replace(tzinfo=timezone(sign * offset))
    except ValueError:
        raise BadValue(f"not a valid date and time: {_show(text)}") from None


def _rfc5322_time(text: str) -> datetime:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        when = None
    if when is None:
        raise BadValue(f"not a date-time in RFC 5322 or ISO 8601 form: {_show(text)}")
    return when


def format_time(when: datetime, style: str) -> str:
    if style == "rfc5322":
        return email.utils.format_datetime(when)
    return when.isoformat(timespec="seconds")


def _show(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def parse_value(header: HeaderSpec, text: str, limits: Limits) -> int | str | datetime:
    """The typed value of ``text`` for ``header``; BadValue says why it is refused."""
    if header.kind == "text":
        return parse_text(text, limits.job_name_max_length)
    if header.kind == "ref":
        return parse_ref(text, limits.ref_number_max_length)
    if header.kind == "time":
        return parse_time(text, limits.local_time_zone)
    if header.kind == "integer":
        return parse_number(text, INT32_MAX)
    if header.kind == "value":
        return parse_send_option(text)
    assert isinstance(header.family, O.FlagFamily)
    return parse_flags(header.family, text)


def format_value(header: HeaderSpec, value: int | str | datetime, limits: Limits) -> str:
    if isinstance(value, datetime):
        return format_time(value, limits.time_format)
    return str(value)


# --- the raw header block -------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    name: str  # as written
    raw: bytes  # the whole field, continuation lines and final CRLF included

    @property
    def value(self) -> str:
        """Unfolded value; non-ASCII bytes become U+FFFD (and are refused by the checks)."""
        _, _, rest = self.raw.partition(b":")
        unfolded = re.sub(rb"\r\n(?=[ \t])", b"", rest).rstrip(b"\r\n")
        return unfolded.decode("ascii", "replace")


def split_message(message: bytes) -> tuple[list[Field], bytes]:
    """The header fields of a canonical (CRLF) message, and everything after them."""
    if message.startswith(b"\r\n") or not message:
        return [], message
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[: end + 2], message[end + 2:])
    fields: list[Field] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = Field(fields[-1].name, fields[-1].raw + line)
        else:
            fields.append(Field(line.partition(b":")[0].decode("ascii", "replace").strip(), line))
    return fields, rest


def control_fields(fields: Iterable[Field]) -> dict[HeaderSpec, list[Field]]:
    found: dict[HeaderSpec, list[Field]] = {}
    for f in fields:
        header = BY_NAME.get(f.name.lower())
        if header is not None:
            found.setdefault(header, []).append(f)
    return found


def rewrite(message: bytes, headers: list[tuple[HeaderSpec, str]]) -> bytes:
    """``message`` without any control header, then ``headers`` appended to its header
    block (in catalog order); every other byte stays as it was."""
    fields, rest = split_message(message)
    kept = b"".join(f.raw for f in fields if f.name.lower() not in BY_NAME)
    added = b"".join(f"{h.name}: {text}\r\n".encode("ascii") for h, text in headers)
    if not fields and not rest.startswith(b"\r\n"):
        rest = b"\r\n" + rest  # a message without a header block gets one
    return kept + added + rest
