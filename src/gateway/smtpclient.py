"""A small, strict ESMTP client protocol with deadlines, for talking to the smarthost.

Not twisted.mail's SMTPClient (twisted-notes §2): that one has no timeouts, never fires
its Deferred when an endpoint loses the connection, and dot-stuffs per 16 KiB chunk
(outbound smuggling).  Here every wait has a deadline, ``connectionLost`` fails every
pending Deferred with the reason (so a TLS verification failure is visible), and the
message goes out in one pre-stuffed wire form (``to_wire``).

Usage, in a coroutine::

    client = await endpoint.connect(SMTPClientFactory(clock, timeouts))
    await client.greeting()
    await client.ehlo("gw.example.test")      # client.extensions: {"SIZE": "1000", ...}
    await client.mail("a@example.test", ["SIZE=123"])
    ...

Replies come back as ``ClientReply`` values whatever their code; only a missing,
malformed or late reply raises.  Pending replies are a FIFO, so pipelining can be added.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from gateway.reply import ReplyClass
from gateway.tls import is_tls_failure

MAX_REPLY_LINE = 2048  # RFC 5321 says 512; be lenient, but bounded
MAX_REPLY_LINES = 100
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |\Z)")
_FORBIDDEN_IN_COMMAND = (b"\r", b"\n", b"\0")


# --- values and errors ---------------------------------------------------------------

@dataclass(frozen=True)
class ClientReply(ReplyClass):
    """A reply from the server; ``lines`` are the texts without code or enhanced code."""

    code: int
    enhanced: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {' / '.join(self.lines)}".replace("  ", " ").strip()


@dataclass(frozen=True)
class ClientTimeouts:
    greeting: float = 120.0
    command: float = 120.0
    data: float = 600.0  # sending the message plus waiting for the final reply


class SMTPClientError(Exception):
    """Base of the client's failures (never raised for a 4xx/5xx reply: those are values)."""


class SMTPProtocolError(SMTPClientError):
    """The server sent something that is not a valid reply, or too much of it."""


class ClientTimeout(SMTPClientError):
    def __init__(self, stage: str, seconds: float) -> None:
        super().__init__(f"no reply to {stage} within {seconds:g}s")
        self.stage = stage
        self.seconds = seconds


class ConnectionLostError(SMTPClientError):
    """The connection ended while a reply was pending; ``reason`` is the original Failure."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"connection lost: {reason.getErrorMessage()}")
        self.reason = reason

    @property
    def is_tls_failure(self) -> bool:
        return is_tls_failure(self.reason)


class InsecureAuthError(SMTPClientError):
    """AUTH refused locally: the connection is not encrypted."""


class CommandInjectionError(SMTPClientError, ValueError):
    """A command to be written contains CR, LF or NUL."""


# --- wire form -----------------------------------------------------------------------

def is_canonical(message: bytes) -> bool:
    """CRLF line endings only: no bare CR, no bare LF."""
    crlf = message.count(b"\r\n")
    return message.count(b"\n") == crlf and message.count(b"\r") == crlf


def to_wire(message: bytes) -> bytes:
    """The DATA wire form of a canonical (CRLF-only, unstuffed) message.

    Every line starting with "." gets one more, the first line included; the result ends
    with CRLF then ".CRLF".  Whole-buffer operations: no chunk boundary can hide a dot.
    """
    if not is_canonical(message):
        raise ValueError("message is not in canonical CRLF form (bare CR or LF)")
    if not message:
        return b".\r\n"
    wire = message.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


def parse_extensions(reply: ClientReply) -> dict[str, str]:
    """EHLO keywords (upper-cased) to their parameters; the first line is the greeting."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


# --- the protocol --------------------------------------------------------------------

@dataclass
class _Pending:
    stage: str
    deferred: defer.Deferred[ClientReply]
    timeout: float
    call: IDelayedCall | None = None
    tls: IOpenSSLClientConnectionCreator | None = None  # start TLS on a 220 to this
    lines: list[tuple[int, str]] = field(default_factory=list)


class SMTPClientProtocol(LineOnlyReceiver):
    """One connection to an SMTP server.  ``tls_on_connect`` gives implicit TLS (465)."""

    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(self, clock: IReactorTime, timeouts: ClientTimeouts,
                 tls_on_connect: IOpenSSLClientConnectionCreator | None = None) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self.extensions: dict[str, str] = {}
        self._tls_on_connect = tls_on_connect
        self._pending: deque[_Pending] = deque()
        self._greeting: defer.Deferred[ClientReply] | None = None
        self._lost: Failure | None = None
        self._more_data = False
        self._close_waiters: list[defer.Deferred[None]] = []

    # --- public API ------------------------------------------------------------------
    @property
    def is_tls(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    @property
    def usable(self) -> bool:
        """Connected, not lost, and no reply pending (what a pool would check)."""
        return (self._lost is None and self.transport is not None
                and not self.transport.disconnecting and not self._pending)

    def greeting(self) -> defer.Deferred[ClientReply]:
        """The server's greeting (armed at connect with the greeting deadline)."""
        assert self._greeting is not None, "not connected"
        return self._greeting

    def command(self, line: bytes, *, timeout: float | None = None,
                stage: str | None = None) -> defer.Deferred[ClientReply]:
        """Send one command line and wait for its reply."""
        self._check_line(line)
        pending = self._expect(stage or line.split(b" ", 1)[0].decode("ascii", "replace").upper(),
                               self.timeouts.command if timeout is None else timeout)
        self._write(line + b"\r\n")
        return pending.deferred

    async def ehlo(self, name: str) -> ClientReply:
        self.extensions = {}
        reply = await self.command(b"EHLO " + _ascii(name), stage="EHLO")
        if reply.code == 250:
            self.extensions = parse_extensions(reply)
        return reply

    async def starttls(self, creator: IOpenSSLClientConnectionCreator) -> ClientReply:
        """STARTTLS; on 220 TLS starts at once (the caller then sends EHLO again)."""
        self._check_line(b"STARTTLS")
        pending = self._expect("STARTTLS", self.timeouts.command)
        pending.tls = creator
        self._write(b"STARTTLS\r\n")
        reply = await pending.deferred
        if reply.code == 220:
            self.extensions = {}
        return reply

    async def auth_plain(self, user: str, password: str, *,
                         allow_insecure: bool = False) -> ClientReply:
        self._require_tls(allow_insecure)
        token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
        return await self.command(b"AUTH PLAIN " + token, stage="AUTH")

    async def auth_login(self, user: str, password: str, *,
                         allow_insecure: bool = False) -> ClientReply:
        self._require_tls(allow_insecure)
        reply = await self.command(b"AUTH LOGIN", stage="AUTH")
        for secret in (user, password):
            if reply.code != 334:
                return reply
            reply = await self.command(base64.b64encode(secret.encode("utf-8")), stage="AUTH")
        return reply

    def mail(self, sender: str, params: Iterable[str] = ()) -> defer.Deferred[ClientReply]:
        line = b"MAIL FROM:<" + _ascii(sender) + b">"
        for param in params:
            line += b" " + _ascii(param)
        return self.command(line, stage="MAIL")

    def rcpt(self, address: str) -> defer.Deferred[ClientReply]:
        return self.command(b"RCPT TO:<" + _ascii(address) + b">", stage="RCPT")

    async def data(self, message: bytes) -> ClientReply:
        """DATA; on 354 send the message and return the final reply (else the DATA reply)."""
        if not is_canonical(message):  # refuse before starting DATA
            raise ValueError("message is not in canonical CRLF form (bare CR or LF)")
        reply = await self.command(b"DATA", stage="DATA")
        if reply.code != 354:
            return reply
        return await self.send_message(message)

    def send_message(self, message: bytes) -> defer.Deferred[ClientReply]:
        """After a 354: write the wire form and wait (data deadline) for the final reply."""
        wire = to_wire(message)
        pending = self._expect("end of data", self.timeouts.data)
        self._write(wire)
        return pending.deferred

    def rset(self) -> defer.Deferred[ClientReply]:
        return self.command(b"RSET")

    def noop(self) -> defer.Deferred[ClientReply]:
        return self.command(b"NOOP")

    async def quit(self) -> ClientReply:
        """QUIT and close; the connection is closed whatever happens."""
        try:
            return await self.command(b"QUIT")
        finally:
            if self.transport is not None:
                self.transport.loseConnection()

    def when_closed(self) -> defer.Deferred[None]:
        """Fires (with None) once the connection is gone."""
        if self._lost is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def abort(self) -> None:
        """Drop the connection now; pending Deferreds fail with ConnectionLostError."""
        if self.transport is not None and self._lost is None:
            self.transport.abortConnection()

    # --- Protocol --------------------------------------------------------------------
    def connectionMade(self) -> None:
        if self._tls_on_connect is not None:
            self.transport.startTLS(self._tls_on_connect)
        self._greeting = self._expect("greeting", self.timeouts.greeting).deferred

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\r\n")
        self._buffer = lines.pop()
        for index, line in enumerate(lines):
            if self.transport.disconnecting or self._lost is not None:
                return
            if len(line) > self.MAX_LENGTH:
                return self._protocol_error("reply line too long")
            self._more_data = index < len(lines) - 1 or bool(self._buffer)
            self.lineReceived(line)
        self._more_data = False
        if len(self._buffer) > self.MAX_LENGTH:
            self._protocol_error("reply line too long")

    def lineReceived(self, line: bytes) -> None:
        match = _REPLY_LINE.match(line)
        if not self._pending:
            return self._protocol_error(f"unexpected reply {line[:80]!r}")
        pending = self._pending[0]
        if match is None:
            return self._protocol_error(f"malformed reply line {line[:80]!r}")
        code, separator, text = int(match[1]), match[2], (match[3] or b"")
        if pending.lines and pending.lines[0][0] != code:
            return self._protocol_error(f"reply code changed within a reply: {line[:80]!r}")
        pending.lines.append((code, text.decode("utf-8", "replace")))
        if separator == b"-":
            if len(pending.lines) >= MAX_REPLY_LINES:
                self._protocol_error("reply has too many lines")
            return
        self._pending.popleft()
        self._cancel_call(pending)
        reply = _make_reply(code, [t for _, t in pending.lines])
        if pending.tls is not None and code == 220:
            if self._more_data:  # plaintext after the 220 would be read as if under TLS
                pending.deferred.errback(SMTPProtocolError("data after the STARTTLS reply"))
                return self._protocol_error("data after the STARTTLS reply")
            self.transport.startTLS(pending.tls)
        pending.deferred.callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("reply line too long")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        self._fail_pending(lambda p: ConnectionLostError(reason))
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # --- internals -------------------------------------------------------------------
    def _expect(self, stage: str, timeout: float) -> _Pending:
        pending = _Pending(stage, defer.Deferred(lambda _d: self.abort()), timeout)
        if self._lost is not None:
            pending.deferred.errback(ConnectionLostError(self._lost))
            return pending
        pending.call = self.clock.callLater(timeout, self._timed_out, pending)
        self._pending.append(pending)
        return pending

    def _timed_out(self, pending: _Pending) -> None:
        pending.call = None
        self._fail_pending(lambda p: ClientTimeout(pending.stage, pending.timeout))
        self.abort()

    def _protocol_error(self, message: str) -> None:
        self._fail_pending(lambda p: SMTPProtocolError(message))
        self.abort()

    def _fail_pending(self, make_error: Any) -> None:
        while self._pending:
            pending = self._pending.popleft()
            self._cancel_call(pending)
            if not pending.deferred.called:
                pending.deferred.errback(make_error(pending))

    @staticmethod
    def _cancel_call(pending: _Pending) -> None:
        if pending.call is not None and pending.call.active():
            pending.call.cancel()
        pending.call = None

    def _check_line(self, line: bytes) -> None:
        if any(ch in line for ch in _FORBIDDEN_IN_COMMAND):
            raise CommandInjectionError(f"refusing to send a command containing CR/LF/NUL: {line[:60]!r}")

    def _require_tls(self, allow_insecure: bool) -> None:
        if not (self.is_tls or allow_insecure):
            raise InsecureAuthError("refusing to send credentials over an unencrypted connection")

    def _write(self, data: bytes) -> None:
        if self._lost is None and self.transport is not None and not self.transport.disconnecting:
            self.transport.write(data)


def _make_reply(code: int, texts: list[str]) -> ClientReply:
    enhanced = ""
    match = _ENHANCED.match(texts[0]) if texts else None
    if match and match[1] == str(code)[0]:
        enhanced = f"{match[1]}.{match[2]}.{match[3]}"
        texts = [t[len(enhanced):].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
    return ClientReply(code, enhanced, tuple(texts))


def _ascii(text: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise CommandInjectionError(f"non-ASCII text in a command: {text!r}") from None


class SMTPClientFactory(Factory):
    """Builds one ``SMTPClientProtocol`` per connection (for an endpoint's ``connect``)."""

    noisy = False  # one factory per delivery: no "Starting factory" line each time

    def __init__(self, clock: IReactorTime, timeouts: ClientTimeouts,
                 tls_on_connect: IOpenSSLClientConnectionCreator | None = None) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self.tls_on_connect = tls_on_connect

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(self.clock, self.timeouts, self.tls_on_connect)
        protocol.factory = self
        return protocol
