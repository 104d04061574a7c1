"""gateway.smtpclient in memory: reply parsing, deadlines, connection loss, wire form."""

from __future__ import annotations

import base64
import random
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.smtpclient import (
    ClientReply,
    ClientTimeout,
    ClientTimeouts,
    CommandInjectionError,
    ConnectionLostError,
    InsecureAuthError,
    SMTPClientProtocol,
    SMTPProtocolError,
    is_canonical,
    parse_extensions,
    to_wire,
)


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started: list[Any] = []

    def startTLS(self, creator: Any) -> None:
        self.tls_started.append(creator)


TIMEOUTS = ClientTimeouts(greeting=5, command=10, data=30)


def connect(greeting: bytes | None = b"220 smarthost.test ESMTP\r\n",
            ) -> tuple[SMTPClientProtocol, TLSStringTransport, Clock]:
    clock = Clock()
    client = SMTPClientProtocol(clock, TIMEOUTS)
    transport = TLSStringTransport()
    client.makeConnection(transport)
    if greeting is not None:
        client.dataReceived(greeting)
    return client, transport, clock


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result of a fired Deferred (a Failure is returned, not raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def sent(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


# --- reply parsing -------------------------------------------------------------------

def test_greeting_parsed():
    client, _, clock = connect(greeting=None)
    d = client.greeting()
    client.dataReceived(b"220 smarthost.test ESMTP ready\r\n")
    assert result_of(d) == ClientReply(220, "", ("smarthost.test ESMTP ready",))
    assert clock.getDelayedCalls() == []


def test_multiline_ehlo_and_extensions():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.ehlo("gw.example.test"))
    assert sent(transport) == b"EHLO gw.example.test\r\n"
    client.dataReceived(b"250-smarthost.test hello\r\n250-SIZE 1000\r\n250-8bitmime\r\n")
    assert not d.called
    client.dataReceived(b"250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
    reply = result_of(d)
    assert reply.code == 250 and len(reply.lines) == 5
    assert client.extensions == {"SIZE": "1000", "8BITMIME": "", "AUTH": "PLAIN LOGIN",
                                 "STARTTLS": ""}
    assert parse_extensions(reply) == client.extensions


@pytest.mark.parametrize("wire, expected", [
    (b"250 2.1.0 Sender ok\r\n", ClientReply(250, "2.1.0", ("Sender ok",))),
    (b"550-5.1.1 no such\r\n550 5.1.1 user\r\n", ClientReply(550, "5.1.1", ("no such", "user"))),
    (b"550 2.1.1 class mismatch\r\n", ClientReply(550, "", ("2.1.1 class mismatch",))),
    (b"250\r\n", ClientReply(250, "", ("",))),
    (b"250 \r\n", ClientReply(250, "", ("",))),
    (b"451 4.3.0\r\n", ClientReply(451, "4.3.0", ("",))),
    (b"250-first\r\n250\r\n", ClientReply(250, "", ("first", ""))),
    (b"250 caf\xc3\xa9\r\n", ClientReply(250, "", ("caf\xe9",))),
])
def test_reply_values(wire, expected):
    client, transport, _ = connect()
    d = client.command(b"NOOP")
    client.dataReceived(wire)
    assert result_of(d) == expected
    assert not transport.disconnecting


@pytest.mark.parametrize("wire", [
    b"2500 too many digits\r\n",
    b"25 short\r\n",
    b"hello\r\n",
    b"250x no separator\r\n",
    b"600 bad class\r\n",
    b"160 bad class\r\n",
    b"270 bad second digit\r\n",
    b"250-first\r\n251 code changed\r\n",
    b"\r\n",
    b"x" * 3000 + b"\r\n",
    b"250-" + b"x" * 3000,  # too long even without its CRLF
    b"250-line\r\n" * 150,
])
def test_malformed_replies_are_protocol_errors(wire):
    client, transport, _ = connect()
    d = client.command(b"NOOP")
    client.dataReceived(wire)
    failure = result_of(d)
    assert isinstance(failure, Failure) and failure.check(SMTPProtocolError), failure
    assert transport.disconnecting


def test_unsolicited_reply_closes():
    client, transport, _ = connect()
    client.dataReceived(b"250 nobody asked\r\n")
    assert transport.disconnecting


def test_replies_are_matched_in_order():
    client, transport, _ = connect()
    first, second = client.command(b"MAIL FROM:<a@b.test>"), client.command(b"RCPT TO:<c@d.test>")
    assert sent(transport) == b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
    client.dataReceived(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n")
    assert result_of(first).code == 250 and result_of(second).code == 550


# --- deadlines and connection loss ---------------------------------------------------

def test_greeting_deadline():
    client, transport, clock = connect(greeting=None)
    d = client.greeting()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    failure = result_of(d)
    assert failure.check(ClientTimeout) and failure.value.stage == "greeting"
    assert transport.disconnecting and clock.getDelayedCalls() == []


def test_command_deadline_fails_everything_pending():
    client, transport, clock = connect()
    first, second = client.command(b"NOOP"), client.command(b"RSET")
    clock.advance(10)
    assert result_of(first).check(ClientTimeout)
    assert result_of(second).check(ClientTimeout)
    assert transport.disconnecting and clock.getDelayedCalls() == []


def test_data_deadline_covers_message_and_final_reply():
    client, transport, clock = connect()
    d = defer.ensureDeferred(client.data(b"Subject: x\r\n\r\nbody\r\n"))
    assert sent(transport) == b"DATA\r\n"
    clock.advance(9)
    client.dataReceived(b"354 go ahead\r\n")
    assert sent(transport) == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    failure = result_of(d)
    assert failure.check(ClientTimeout) and failure.value.stage == "end of data"


def test_data_final_reply():
    client, transport, clock = connect()
    d = defer.ensureDeferred(client.data(b".hidden\r\n"))
    client.dataReceived(b"354 go ahead\r\n")
    assert sent(transport) == b"DATA\r\n..hidden\r\n.\r\n"
    client.dataReceived(b"250 2.0.0 queued\r\n")
    assert result_of(d) == ClientReply(250, "2.0.0", ("queued",))
    assert clock.getDelayedCalls() == []


def test_data_refused_returns_that_reply():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.data(b"x\r\n"))
    client.dataReceived(b"554 5.5.1 no valid recipients\r\n")
    assert result_of(d).code == 554
    assert sent(transport) == b"DATA\r\n"


def test_connection_lost_fails_every_pending_with_reason():
    client, _, clock = connect()
    first, second = client.command(b"NOOP"), client.command(b"RSET")
    reason = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
    client.connectionLost(reason)
    for d in (first, second):
        failure = result_of(d)
        assert failure.check(ConnectionLostError)
        assert failure.value.reason is reason and failure.value.is_tls_failure
    assert clock.getDelayedCalls() == []
    later = result_of(client.command(b"NOOP"))
    assert later.check(ConnectionLostError)
    assert result_of(client.when_closed()) is None


def test_plain_connection_loss_is_not_tls():
    client, _, _ = connect(greeting=None)
    client.connectionLost(Failure(error.ConnectionDone()))
    failure = result_of(client.greeting())
    assert failure.check(ConnectionLostError) and not failure.value.is_tls_failure


def test_cancel_aborts_connection():
    client, transport, clock = connect()
    d = client.command(b"NOOP")
    d.cancel()
    assert result_of(d).check(defer.CancelledError)
    assert transport.disconnecting
    client.connectionLost(Failure(error.ConnectionAborted()))
    assert clock.getDelayedCalls() == []


# --- smuggling defences --------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda c: c.command(b"NOOP\r\nRSET"),
    lambda c: c.command(b"NOOP\nRSET"),
    lambda c: c.command(b"NOOP\0"),
    lambda c: c.mail("a\r\nRCPT TO:<evil@x.test>@b.test"),
    lambda c: c.mail("a@b.test", ["SIZE=1\r\nRSET"]),
    lambda c: c.rcpt("a@b.test>\nDATA"),
    lambda c: c.rcpt("caf\xe9@b.test"),
])
def test_commands_with_line_breaks_are_refused(call):
    client, transport, _ = connect()
    with pytest.raises(CommandInjectionError):
        call(client)
    assert transport.value() == b""


def test_starttls_reply_followed_by_plaintext_is_an_injection():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.starttls(object()))
    assert sent(transport) == b"STARTTLS\r\n"
    client.dataReceived(b"220 go ahead\r\n250 injected\r\n")
    assert result_of(d).check(SMTPProtocolError)
    assert transport.tls_started == [] and transport.disconnecting


def test_starttls_starts_tls_before_anything_else_is_sent():
    client, transport, _ = connect()
    creator = object()
    client.extensions = {"STARTTLS": ""}
    d = defer.ensureDeferred(client.starttls(creator))
    client.dataReceived(b"220 2.0.0 go ahead\r\n")
    assert result_of(d).code == 220
    assert transport.tls_started == [creator] and client.extensions == {}


def test_starttls_refused_keeps_plaintext():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.starttls(object()))
    client.dataReceived(b"454 4.7.0 TLS not available\r\n")
    assert result_of(d).code == 454 and transport.tls_started == []


# --- AUTH ----------------------------------------------------------------------------

def test_auth_refused_without_tls():
    client, transport, _ = connect()
    for method in (client.auth_plain, client.auth_login):
        d = defer.ensureDeferred(method("user", "secret"))
        assert result_of(d).check(InsecureAuthError)
    assert transport.value() == b""


def test_auth_plain_when_allowed_insecure():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.auth_plain("user", "secret", allow_insecure=True))
    assert sent(transport) == b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
    client.dataReceived(b"235 2.7.0 ok\r\n")
    assert result_of(d).code == 235


def test_auth_login_dialog():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.auth_login("user", "secret", allow_insecure=True))
    assert sent(transport) == b"AUTH LOGIN\r\n"
    client.dataReceived(b"334 VXNlcm5hbWU6\r\n")
    assert sent(transport) == base64.b64encode(b"user") + b"\r\n"
    client.dataReceived(b"334 UGFzc3dvcmQ6\r\n")
    assert sent(transport) == base64.b64encode(b"secret") + b"\r\n"
    client.dataReceived(b"535 5.7.8 nope\r\n")
    assert result_of(d) == ClientReply(535, "5.7.8", ("nope",))


def test_auth_login_stops_at_first_refusal():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.auth_login("user", "secret", allow_insecure=True))
    sent(transport)
    client.dataReceived(b"504 5.5.4 not here\r\n")
    assert result_of(d).code == 504 and transport.value() == b""


def test_quit_closes():
    client, transport, _ = connect()
    d = defer.ensureDeferred(client.quit())
    assert sent(transport) == b"QUIT\r\n"
    client.dataReceived(b"221 2.0.0 bye\r\n")
    assert result_of(d).code == 221 and transport.disconnecting


# --- wire form -----------------------------------------------------------------------

@pytest.mark.parametrize("message, wire", [
    (b"", b".\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b".first\r\nsecond\r\n", b"..first\r\nsecond\r\n.\r\n"),
    (b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b"a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"),
    (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
    (b"no final crlf", b"no final crlf\r\n.\r\n"),
    (b"ends with dot line\r\n.", b"ends with dot line\r\n..\r\n.\r\n"),
    (b"\r\n", b"\r\n.\r\n"),
])
def test_to_wire(message, wire):
    assert to_wire(message) == wire


@pytest.mark.parametrize("message", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n\r", b"\n.\r\n"])
def test_to_wire_refuses_bare_line_breaks(message):
    assert not is_canonical(message)
    with pytest.raises(ValueError):
        to_wire(message)


def _unstuff(wire: bytes) -> bytes:
    """What a strict server keeps: ends at the first CRLF.CRLF, one dot off each line."""
    end = (b"\r\n" + wire).find(b"\r\n.\r\n")
    content = wire[:end]
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]


def test_to_wire_round_trips_random_dot_lines():
    rng = random.Random(5321)
    pieces = [b".", b"..", b".\r\n", b"\r\n", b"\r\n.", b"x", b"MAIL FROM:<a@b>", b" "]
    for _ in range(500):
        message = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        wire = to_wire(message)
        assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
        assert _unstuff(wire) == message
