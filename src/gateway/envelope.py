"""Envelope values: strict RFC 5321 address parsing, the Envelope record, queue ids.

Addresses are parsed by a strict grammar: no control characters anywhere (a quoted
local-part with a bare CR/LF is how a client smuggles commands to the smarthost), ASCII
only (the gateway does not offer SMTPUTF8 and says so), RFC length limits.  A source route
is accepted and ignored, as RFC 5321 §4.1.1.3 asks; relaying never depends on the
address, so neither a route, a ``%`` nor a quoted form can open the relay.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway import reply as R
from gateway.reply import ReplyError

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# qtextSMTP: %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP: backslash + %d32-126
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL_RE = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED})\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_ROUTE_RE = re.compile(rf"(?:@{_LABEL}(?:\.{_LABEL})*,)*@{_LABEL}(?:\.{_LABEL})*:")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


@dataclass(frozen=True, order=True)
class Address:
    """A mailbox.  ``Address("", "")`` is the null reverse-path ``<>``."""

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    def __str__(self) -> str:
        return "" if self.is_null else f"{self.local}@{self.domain}"

    def bracketed(self) -> str:
        return f"<{self}>"


NULL_SENDER = Address("", "")


def parse_address(text: str, *, is_sender: bool) -> Address:
    """Parse the inside of a path (no angle brackets).  Raises ReplyError."""
    bad = R.BAD_SENDER_SYNTAX if is_sender else R.BAD_RCPT_SYNTAX
    if any(ord(ch) > 127 for ch in text):
        raise ReplyError(R.NON_ASCII_ADDRESS, f"non-ASCII address {text!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ReplyError(bad, f"control character in address {text!r}")
    if text == "":
        if is_sender:
            return NULL_SENDER
        raise ReplyError(bad, "empty recipient")
    if len(text) > MAX_PATH:
        raise ReplyError(bad, "address too long")
    route = _ROUTE_RE.match(text)
    if route:
        text = text[route.end():]
    at = text.rfind("@")
    if at <= 0:
        raise ReplyError(bad, f"address without domain {text!r}")
    local, domain = text[:at], text[at + 1:]
    if len(local) > MAX_LOCAL or not _LOCAL_RE.match(local):
        raise ReplyError(bad, f"bad local-part {local!r}")
    return Address(local, _parse_domain(domain, bad))


def _parse_domain(domain: str, bad: R.Reply) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(literal[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(literal)}]"
        except ValueError:
            raise ReplyError(bad, f"bad address literal {domain!r}") from None
    if len(domain) > MAX_DOMAIN or not _DOMAIN_RE.match(domain):
        raise ReplyError(bad, f"bad domain {domain!r}")
    return domain.lower()


def parse_path_and_params(arg: str, *, is_sender: bool) -> tuple[Address, dict[str, str | None]]:
    """Parse ``<path> [KEY[=VALUE] ...]`` (the text after ``FROM:``/``TO:``)."""
    bad = R.BAD_SENDER_SYNTAX if is_sender else R.BAD_RCPT_SYNTAX
    arg = arg.lstrip(" ")
    if arg.startswith("<"):
        end = _closing_bracket(arg)
        if end < 0:
            raise ReplyError(bad, "unterminated path")
        path, rest = arg[1:end], arg[end + 1:]
        if rest and not rest.startswith(" "):
            raise ReplyError(bad, "garbage after path")
    else:
        # Old printers and scripts omit the brackets; accept a bare mailbox.
        path, _, rest = arg.partition(" ")
        if not path or "<" in path or ">" in path:
            raise ReplyError(bad, "missing path")
    address = parse_address(path, is_sender=is_sender)
    params: dict[str, str | None] = {}
    for token in rest.split():
        key, eq, value = token.partition("=")
        if not _KEYWORD_RE.match(key) or (eq and not _VALUE_RE.match(value)):
            raise ReplyError(R.SYNTAX_ERROR, f"bad parameter {token!r}")
        key = key.upper()
        if key in params:
            raise ReplyError(R.SYNTAX_ERROR, f"duplicate parameter {key}")
        params[key] = value if eq else None
    return address, params


def _closing_bracket(arg: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted strings."""
    quoted = escaped = False
    for i, ch in enumerate(arg[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


_BASE32 = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words


def new_queue_id(now: float | None = None) -> str:
    """A unique, time-ordered, filename-safe queue id like ``2QJ8ZN5K1XVMB7RT``."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    rand = int.from_bytes(os.urandom(5), "big")
    return _encode(micros, 11) + _encode(rand, 8)


def _encode(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, len(_BASE32))
        out.append(_BASE32[r])
    return "".join(reversed(out))


@dataclass(frozen=True)
class Envelope:
    """What the spool keeps beside the message: who sent what to whom, and how it came."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    received_at: float
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str | None = None
    listener: str = ""
    body_8bit: bool = False
    size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # room for later stages

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["recipients"] = tuple(values.get("recipients", ()))
        return cls(**values)
