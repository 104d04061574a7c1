"""An in-test SMTP sink that records exactly what a smarthost receives.

Its own small server (not twisted.mail): it handles pipelined commands, ends DATA only on
CRLF.CRLF (so a smuggling attempt shows up as a second message), advertises PIPELINING,
SIZE, 8BITMIME, STARTTLS (security="starttls", before TLS) and AUTH PLAIN LOGIN (when
``users`` is set; only under TLS unless security="none").  Every stage can be made to
fail::

    fs = FakeSmarthost(reactor, security="starttls", cert=server_cert, users={"u": "p"},
                       responses={"greeting": "421 4.3.2 busy",
                                  "rcpt": {"bad@x.test": "550 5.1.1 no such user"},
                                  "data_end": "451 4.3.0 try later"},
                       drop_after="mail", stall_at="data_end")
    port = await fs.start(); ...; await fs.wait_for_messages(1); await fs.stop()

Stages: greeting, ehlo (also HELO), starttls, auth, mail, rcpt, data, data_end, rset,
quit.  A response is a reply string (lines separated by "\\n", "-" continuation added)
or raw bytes sent verbatim; a 421 closes the connection after it is sent.
``drop_after=stage`` closes the connection when that stage's command arrives (no reply);
``stall_at=stage`` never answers it.

Standalone (for benchmarks): ``python tests/fakesmarthost.py --port N [--security S]
[--cert X --key Y]`` counts messages and prints the count on SIGTERM.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

HOSTNAME = "fake.smarthost.test"
MAX_LINE = 4096
_END = b"\r\n.\r\n"


@dataclass
class Received:
    """One completed DATA transaction, as the sink saw it."""

    helo: str | None
    tls: bool
    auth_user: str | None
    mail_from: str
    mail_params: dict[str, str | None]
    rcpt_to: list[str]
    raw_data: bytes  # as on the wire after 354: dot-stuffed, including the final ".\r\n"
    data: bytes  # unstuffed
    accepted: bool = True  # False: answered 4xx/5xx, dropped or stalled at data_end
    reply: str = ""

    @property
    def message_id(self) -> str:
        """The Message-ID header's value ("" without one)."""
        _, found, rest = self.data.partition(b"Message-ID: ")
        return rest.split(b"\r\n", 1)[0].decode() if found else ""


@dataclass
class _Transaction:
    mail_from: str
    mail_params: dict[str, str | None]
    rcpt_to: list[str] = field(default_factory=list)


class FakeSmarthost:
    """The sink.  ``messages``: every completed DATA (see ``Received``); ``commands``: every
    command line received, in order (DATA contents excluded); ``count``/``connections``:
    totals; ``responses`` may be changed while running (e.g. pop "greeting")."""

    def __init__(self, reactor: Any, security: str = "none", cert: Any = None,
                 users: dict[str, str] | None = None, responses: dict[str, Any] | None = None,
                 drop_after: str | None = None, stall_at: str | None = None,
                 keep_messages: bool = True, max_size: int = 50 * 1024 * 1024,
                 interface: str = "127.0.0.1") -> None:
        if security not in ("none", "starttls", "smtps"):
            raise ValueError(f"bad security {security!r}")
        if security != "none" and cert is None:
            raise ValueError(f"security={security!r} needs cert=")
        self.reactor = reactor
        self.security = security
        self.users = users
        self.responses = responses if responses is not None else {}
        self.drop_after = drop_after
        self.stall_at = stall_at
        self.keep_messages = keep_messages
        self.max_size = max_size
        self.interface = interface
        self.creator = None
        if cert is not None:
            from gateway.tls import server_creator
            self.creator = server_creator(Path(cert.cert), Path(cert.key))
        self.messages: list[Received] = []
        self.commands: list[bytes] = []
        self.count = 0  # completed DATA transactions (also when messages are not kept)
        self.connections = 0  # connections accepted so far
        self._open: dict[_SinkProtocol, defer.Deferred[None]] = {}
        self._waiters: list[tuple[int, defer.Deferred[list[Received]]]] = []
        self._port: Any = None
        self.port: int | None = None  # the listening port once started

    async def start(self, port: int = 0) -> int:
        factory: Any = Factory.forProtocol(lambda: _SinkProtocol(self))
        if self.security == "smtps":
            factory = TLSMemoryBIOFactory(self.creator, False, factory)
        self._port = self.reactor.listenTCP(port, factory, interface=self.interface)
        self.port = self._port.getHost().port
        return self.port

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        closing = list(self._open.values())
        for protocol in list(self._open):
            protocol.transport.abortConnection()
        await defer.gatherResults(closing)
        for _, waiter in self._waiters:
            waiter.cancel()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> defer.Deferred[list[Received]]:
        """Fires with ``messages`` once ``n`` DATA transactions have completed."""
        if self.count >= n:
            return defer.succeed(self.messages)
        d: defer.Deferred[list[Received]] = defer.Deferred()
        entry = (n, d)
        self._waiters.append(entry)
        d.addTimeout(timeout, self.reactor)

        def forget(result: Any) -> Any:
            if entry in self._waiters:
                self._waiters.remove(entry)
            return result
        return d.addBoth(forget)

    def wait_closed(self) -> defer.Deferred[Any]:
        """Fires when every connection open now has closed."""
        return defer.gatherResults(list(self._open.values()))

    # --- called by the protocol --------------------------------------------------------
    def _record(self, message: Received) -> None:
        self.count += 1
        if self.keep_messages:
            self.messages.append(message)
        for n, waiter in list(self._waiters):
            if self.count >= n:
                self._waiters.remove((n, waiter))
                waiter.callback(self.messages)

    def response(self, stage: str, key: str | None = None) -> Any:
        value = self.responses.get(stage)
        if isinstance(value, dict):
            return value.get(key) if key is not None else None
        return value


def format_reply(reply: str | bytes) -> bytes:
    if isinstance(reply, bytes):
        return reply
    lines = reply.split("\n")
    out = []
    for i, line in enumerate(lines):
        code, text = line[:3], line[4:]
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{text}".rstrip(" ").encode("utf-8") + b"\r\n")
    return b"".join(out)


class _SinkProtocol(Protocol):
    def __init__(self, sink: FakeSmarthost) -> None:
        self.sink = sink
        self.tls = sink.security == "smtps"
        self.helo: str | None = None
        self.auth_user: str | None = None
        self.txn: _Transaction | None = None
        self.buffer = b""
        self.mode = "command"  # command | data | auth_plain | auth_user | auth_pass | dead
        self.auth_login_user = ""
        self.data = bytearray()
        self.scan = 0

    # --- connection ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.sink._open[self] = defer.Deferred()
        if not self._intercept("greeting"):
            self._reply("greeting", f"220 {HOSTNAME} ESMTP fake smarthost")

    def connectionLost(self, reason: Any = None) -> None:
        self.mode = "dead"
        closed = self.sink._open.pop(self, None)
        if closed is not None:
            closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and self.mode != "dead":
            if self.mode == "data":
                if not self._data_chunk():
                    return
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self._send("500 5.5.6 Line too long")
                    self._close()
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            self.sink.commands.append(line)
            self._line(line)

    # --- helpers -------------------------------------------------------------------------
    def _send(self, reply: str | bytes) -> None:
        self.transport.write(format_reply(reply))

    def _reply(self, stage: str, default: str, key: str | None = None) -> int:
        """Send the injected reply for ``stage`` or ``default``; returns its code."""
        reply = self.sink.response(stage, key) or default
        self._send(reply)
        code = int(reply[:3]) if reply[:3].isdigit() else 0
        if code == 421:
            self._close()
        return code

    def _intercept(self, stage: str) -> bool:
        """Drop or stall here when asked to: True means "do not answer"."""
        if self.sink.drop_after == stage:
            self._close()
            return True
        if self.sink.stall_at == stage:
            self.mode = "dead"
            self.buffer = b""
            return True
        return False

    def _close(self) -> None:
        self.mode = "dead"
        self.buffer = b""
        self.transport.loseConnection()

    def _auth_offered(self) -> bool:
        return self.sink.users is not None and (self.tls or self.sink.security == "none")

    # --- commands ------------------------------------------------------------------------
    def _line(self, line: bytes) -> None:
        if self.mode.startswith("auth_"):
            return self._auth_continue(line)
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"do_{verb.upper()}", None)
        if handler is None:
            self._send("500 5.5.2 Command not recognized")
        else:
            handler(arg)

    def do_EHLO(self, arg: str) -> None:
        if self._intercept("ehlo"):
            return
        self.helo, self.txn = arg, None
        lines = [f"250 {HOSTNAME} greets {arg}", "250 PIPELINING",
                 f"250 SIZE {self.sink.max_size}", "250 8BITMIME", "250 ENHANCEDSTATUSCODES"]
        if self.sink.security == "starttls" and not self.tls:
            lines.append("250 STARTTLS")
        if self._auth_offered():
            lines.append("250 AUTH PLAIN LOGIN")
        self._reply("ehlo", "\n".join(lines))

    def do_HELO(self, arg: str) -> None:
        if self._intercept("ehlo"):
            return
        self.helo, self.txn = arg, None
        self._reply("ehlo", f"250 {HOSTNAME}")

    def do_STARTTLS(self, arg: str) -> None:
        if self._intercept("starttls"):
            return
        if self.sink.security != "starttls" or self.tls:
            return self._send("503 5.5.1 TLS not available or already active")
        if self._reply("starttls", "220 2.0.0 Ready to start TLS") != 220:
            return
        self.buffer = b""  # anything pipelined after STARTTLS is an injection: discard
        self.transport.startTLS(self.sink.creator)
        self.tls = True
        self.helo = self.auth_user = self.txn = None

    def do_AUTH(self, arg: str) -> None:
        if self._intercept("auth"):
            return
        if not self._auth_offered():
            return self._send("530 5.7.0 Must issue a STARTTLS command first" if
                              self.sink.users is not None else "502 5.5.1 AUTH not available")
        if self.auth_user is not None:
            return self._send("503 5.5.1 Already authenticated")
        if self.sink.response("auth"):
            self._reply("auth", "")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial.encode())
            self.mode = "auth_plain"
            return self._send("334 ")
        if mechanism == "LOGIN":
            self.mode = "auth_user"
            return self._send("334 VXNlcm5hbWU6")
        self._send("504 5.5.4 Unrecognized authentication mechanism")

    def _auth_continue(self, line: bytes) -> None:
        mode, self.mode = self.mode, "command"
        if line == b"*":
            return self._send("501 5.7.0 Authentication aborted")
        if mode == "auth_plain":
            return self._auth_plain(line)
        try:
            value = base64.b64decode(line, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return self._send("501 5.5.2 Cannot decode response")
        if mode == "auth_user":
            self.auth_login_user, self.mode = value, "auth_pass"
            return self._send("334 UGFzc3dvcmQ6")
        self._auth_check(self.auth_login_user, value)

    def _auth_plain(self, token: bytes) -> None:
        try:
            _authz, user, password = base64.b64decode(token, validate=True).decode().split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._send("501 5.5.2 Cannot decode response")
        self._auth_check(user, password)

    def _auth_check(self, user: str, password: str) -> None:
        if self.sink.users is not None and self.sink.users.get(user) == password:
            self.auth_user = user
            self._send("235 2.7.0 Authentication successful")
        else:
            self._send("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg: str) -> None:
        if self._intercept("mail"):
            return
        if self.helo is None or self.txn is not None:
            return self._send("503 5.5.1 Bad sequence of commands")
        if self.sink.users is not None and self.auth_user is None:
            return self._send("530 5.7.0 Authentication required")
        address, params = _parse_path(arg, "FROM:")
        if address is None:
            return self._send("501 5.5.4 Syntax error")
        size = params.get("SIZE")
        if size is not None and size.isdigit() and int(size) > self.sink.max_size:
            return self._send("552 5.3.4 Message size exceeds fixed maximum message size")
        if self._reply("mail", "250 2.1.0 Ok") // 100 == 2:
            self.txn = _Transaction(address, params)

    def do_RCPT(self, arg: str) -> None:
        if self._intercept("rcpt"):
            return
        if self.txn is None:
            return self._send("503 5.5.1 Need MAIL command first")
        address, _params = _parse_path(arg, "TO:")
        if address is None:
            return self._send("501 5.5.4 Syntax error")
        if self._reply("rcpt", "250 2.1.5 Ok", key=address) // 100 == 2:
            self.txn.rcpt_to.append(address)

    def do_DATA(self, arg: str) -> None:
        if self._intercept("data"):
            return
        if self.txn is None or not self.txn.rcpt_to:
            return self._send("503 5.5.1 Need RCPT command first")
        if self._reply("data", "354 End data with <CR><LF>.<CR><LF>") == 354:
            self.mode, self.data, self.scan = "data", bytearray(b"\r\n"), 0

    def _data_chunk(self) -> bool:
        """Consume DATA bytes; True when the message ended (the rest stays in buffer)."""
        self.data += self.buffer
        self.buffer = b""
        end = self.data.find(_END, self.scan)
        if end < 0:
            self.scan = max(0, len(self.data) - len(_END))
            return False
        raw = bytes(self.data[2:end + 5])
        self.buffer = bytes(self.data[end + 5:])
        self.data, self.mode = bytearray(), "command"
        self._end_of_data(raw)
        return True

    def _end_of_data(self, raw: bytes) -> None:
        txn, self.txn = self.txn, None
        assert txn is not None
        content = raw[:-3]
        message = Received(self.helo, self.tls, self.auth_user, txn.mail_from, txn.mail_params,
                           txn.rcpt_to, raw, (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:])
        if self.sink.drop_after == "data_end" or self.sink.stall_at == "data_end":
            message.accepted, message.reply = False, "(no reply)"
            self.sink._record(message)
            self._intercept("data_end")
            return
        reply = self.sink.response("data_end") or f"250 2.0.0 Ok: queued as {self.sink.count + 1}"
        message.accepted, message.reply = reply.startswith("2"), reply
        self.sink._record(message)
        self._reply("data_end", reply)

    def do_RSET(self, arg: str) -> None:
        if not self._intercept("rset"):
            self.txn = None
            self._reply("rset", "250 2.0.0 Ok")

    def do_NOOP(self, arg: str) -> None:
        self._send("250 2.0.0 Ok")

    def do_QUIT(self, arg: str) -> None:
        if not self._intercept("quit"):
            self._reply("quit", "221 2.0.0 Bye")
            self._close()


def _parse_path(arg: str, prefix: str) -> tuple[str | None, dict[str, str | None]]:
    if not arg.upper().startswith(prefix):
        return None, {}
    rest = arg[len(prefix):].lstrip()
    if not rest.startswith("<") or ">" not in rest:
        return None, {}
    address, _, tail = rest[1:].partition(">")
    params: dict[str, str | None] = {}
    for token in tail.split():
        key, eq, value = token.partition("=")
        params[key.upper()] = value if eq else None
    return address, params


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    parser = argparse.ArgumentParser(description="A counting SMTP sink.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--security", choices=("none", "starttls", "smtps"), default="none")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep messages in memory")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    @dataclass
    class _Cert:
        cert: Path
        key: Path

    cert = _Cert(args.cert, args.key) if args.cert and args.key else None
    sink = FakeSmarthost(reactor, security=args.security, cert=cert,
                         keep_messages=args.keep, interface=args.interface)

    async def run() -> None:
        port = await sink.start(args.port)
        print(f"listening on {args.interface}:{port}", flush=True)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: print(f"messages: {sink.count}", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
