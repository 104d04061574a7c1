"""SASL PLAIN and LOGIN exchanges (RFC 4954, RFC 4616), as small state machines.

An exchange takes the client's base64 lines and answers with the next challenge or the
credentials.  Malformed input is a ``ReplyError`` (501), never an exception that drops
the connection (twisted-notes §1.2: bare AUTH and malformed PLAIN crash twisted.mail).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from gateway import reply as R
from gateway.reply import ReplyError

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def _decode(line: bytes) -> bytes:
    line = line.strip()
    if line == b"*":
        raise ReplyError(R.AUTH_ABORTED, "client aborted the exchange")
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise ReplyError(R.AUTH_SYNTAX, "bad base64") from None


def _text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ReplyError(R.AUTH_SYNTAX, "credentials are not UTF-8") from None
    if any(ord(ch) < 32 for ch in text):
        raise ReplyError(R.AUTH_SYNTAX, "control character in credentials")
    return text


class Exchange:
    """``start(initial)`` then ``step(line)``: each returns a challenge (bytes to send after
    ``334 ``) or the final ``Credentials``."""

    mechanism = ""
    username = ""

    def start(self, initial: bytes | None) -> bytes | Credentials:
        raise ReplyError(R.AUTH_MECHANISM)

    def step(self, line: bytes) -> bytes | Credentials:
        raise ReplyError(R.BAD_SEQUENCE)


class PlainExchange(Exchange):
    mechanism = "PLAIN"

    def start(self, initial: bytes | None) -> bytes | Credentials:
        if initial is None:
            return b""
        return self.step(initial)

    def step(self, line: bytes) -> bytes | Credentials:
        parts = _decode(line).split(b"\0")
        if len(parts) != 3:
            raise ReplyError(R.AUTH_SYNTAX, "PLAIN response is not authzid NUL authcid NUL passwd")
        authzid, authcid, password = (_text(p) for p in parts)
        self.username = authcid
        if not authcid or not password:
            raise ReplyError(R.AUTH_SYNTAX, "empty username or password")
        if authzid and authzid != authcid:
            # Acting as another user is not offered.
            raise ReplyError(R.AUTH_FAILED, f"authorization identity {authzid!r} != {authcid!r}")
        return Credentials(authcid, password)


class LoginExchange(Exchange):
    mechanism = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> bytes | Credentials:
        if initial is None:
            return base64.b64encode(b"Username:")
        return self.step(initial)

    def step(self, line: bytes) -> bytes | Credentials:
        value = _text(_decode(line))
        if self._user is None:
            if not value:
                raise ReplyError(R.AUTH_SYNTAX, "empty username")
            self._user = self.username = value
            return base64.b64encode(b"Password:")
        if not value:
            raise ReplyError(R.AUTH_SYNTAX, "empty password")
        return Credentials(self._user, value)


def exchange_for(mechanism: str) -> Exchange:
    if mechanism == "PLAIN":
        return PlainExchange()
    if mechanism == "LOGIN":
        return LoginExchange()
    raise ReplyError(R.AUTH_MECHANISM, f"mechanism {mechanism!r}")
