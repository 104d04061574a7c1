"""The listener driven in memory: StringTransport + task.Clock, one dialog per test."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides

from gateway import reply as R
from gateway.auth import AuthThrottle, Identity, make_portal
from gateway.config import LimitsSection
from gateway.listener import ConnectionCounter, ListenerContext, ListenerSettings
from gateway.reply import ReplyError
from gateway.smtpd import GatewaySMTPFactory

TRUSTED = (ipaddress.ip_network("127.0.0.0/8"),)


class RecordingSink:
    """A sink that fires when told to (``manual``) or at once, and records messages."""

    def __init__(self, manual: bool = False, error: Exception | None = None) -> None:
        self.manual, self.error = manual, error
        self.messages: list[tuple] = []
        self.pending: list[defer.Deferred] = []

    def submit(self, envelope, message):
        self.messages.append((envelope, message))
        if self.error is not None:
            return defer.fail(self.error)
        if self.manual:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(None)


class FixedChecker:
    """A checker accepting alice/secret; ``down`` makes it unavailable."""

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def __init__(self) -> None:
        self.down = False

    def requestAvatarId(self, credentials):
        from twisted.cred.error import UnauthorizedLogin

        from gateway.auth import BackendUnavailable
        if self.down:
            return defer.fail(BackendUnavailable("down"))
        if credentials.username == b"alice" and credentials.password == b"secret":
            return defer.succeed(Identity("alice", "file", ("alice@example.com",)))
        return defer.fail(UnauthorizedLogin())


class Dialog:
    def __init__(self, *, mode: str = "smtp", ip: str = "127.0.0.1", tls: bool = False,
                 sink: RecordingSink | None = None, trusted=TRUSTED, limits: LimitsSection | None = None,
                 checker: FixedChecker | None = None, clock: task.Clock | None = None,
                 connections: ConnectionCounter | None = None) -> None:
        self.clock = clock or task.Clock()
        self.sink = sink or RecordingSink()
        self.checker = checker or FixedChecker()
        settings = ListenerSettings(name=mode, mode=mode, hostname="gw.example.test",
                                    limits=limits or LimitsSection(), trusted_networks=trusted)
        self.context = ListenerContext(
            settings=settings, clock=self.clock, portal=make_portal([self.checker]),
            starttls_creator=None, sink=self.sink,
            throttle=AuthThrottle(3, 300, self.clock),
            connections=connections or ConnectionCounter(100, 10))
        self.proto = GatewaySMTPFactory(self.context).buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        if tls:
            alsoProvides(self.transport, ISSLTransport)
        self.proto.makeConnection(self.transport)
        self.greeting = self.read()

    def read(self) -> list[str]:
        out = self.transport.value().decode()
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]

    def send(self, data: bytes) -> list[str]:
        self.proto.dataReceived(data)
        return self.read()

    def codes(self, data: bytes) -> list[str]:
        """The final reply line of each reply, as "code enhanced"."""
        return [" ".join(line.split()[:2]) for line in self.send(data) if line[3:4] == " "]


def test_greeting_and_ehlo_extensions():
    d = Dialog()
    assert d.greeting == ["220 gw.example.test ESMTP itpison-gateway"]
    lines = d.send(b"EHLO client.example\r\n")
    assert lines[0].startswith("250-gw.example.test Hello client.example [127.0.0.1]")
    assert set(lines[1:]) == {"250-PIPELINING", "250-SIZE 36700160", "250-8BITMIME",
                              "250 ENHANCEDSTATUSCODES"}  # no AUTH, no STARTTLS without TLS


def test_trusted_transaction_and_pipelining_in_order():
    sink = RecordingSink(manual=True)
    d = Dialog(sink=sink)
    d.send(b"EHLO c\r\n")
    stream = (b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
              b"Subject: t\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<d@y.test>\r\n"
              b"DATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert d.codes(stream) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End"]
    assert len(sink.messages) == 1  # the second message waits while the spool works
    sink.pending[0].callback(None)
    lines = d.codes(b"")
    assert lines[0] == "250 2.0.0" and lines[1:] == ["250 2.1.0", "250 2.1.5", "354 End"]
    sink.pending[1].callback(None)
    assert d.codes(b"") == ["250 2.0.0", "221 2.0.0"]
    env, msg = sink.messages[0]
    assert env.recipients == ("b@y.test", "c@y.test") and env.sender == "a@x.test"
    assert msg.startswith(b"Received: from c ([127.0.0.1])\r\n\tby gw.example.test")
    assert msg.endswith(b"Subject: t\r\n\r\nbody\r\n")
    assert b"for <" not in msg.split(b"Subject")[0]  # two recipients: no "for" (no Bcc leak)


def test_queue_id_in_250():
    d = Dialog()
    d.send(b"HELO c\r\n")
    lines = d.send(b"MAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n")
    qid = d.sink.messages[0][0].queue_id
    assert lines[-1] == f"250 2.0.0 Ok: queued as {qid}"


@pytest.mark.parametrize("error,expected", [
    (ReplyError(R.SPOOL_FULL), "452 4.3.1"),
    (ReplyError(R.LOCAL_ERROR), "451 4.3.0"),
    (RuntimeError("boom"), "451 4.3.0"),  # unknown errors are temporary
])
def test_spool_failure_never_250(error, expected):
    d = Dialog(sink=RecordingSink(error=error))
    d.send(b"EHLO c\r\n")
    assert d.codes(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n")[-1] == expected


def test_untrusted_smtp_is_not_an_open_relay():
    d = Dialog(ip="192.0.2.7")
    d.send(b"EHLO c\r\n")
    assert d.codes(b"MAIL FROM:<a@x.test>\r\n") == ["250 2.1.0"]
    for rcpt in [b"<b@y.test>", b"<@gw.example.test:b@y.test>", b'<"b@y.test"@gw.example.test>',
                 b"<b%y.test@gw.example.test>"]:
        assert d.codes(b"RCPT TO:" + rcpt + b"\r\n") == ["554 5.7.1"]
    assert d.codes(b"DATA\r\n") == ["554 5.5.1"]
    assert d.sink.messages == []


@pytest.mark.parametrize("mode", ["submission", "smtps"])
def test_untrusted_submission_needs_auth(mode):
    d = Dialog(mode=mode, ip="192.0.2.7", tls=True)
    d.send(b"EHLO c\r\n")
    assert d.codes(b"MAIL FROM:<a@x.test>\r\n") == ["530 5.7.0"]


def test_submission_needs_tls_before_mail_and_auth():
    d = Dialog(mode="submission")
    d.send(b"EHLO c\r\n")
    assert d.codes(b"MAIL FROM:<a@x.test>\r\n") == ["530 5.7.0"]
    assert d.codes(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n") == ["530 5.7.0"]


def plain(user: bytes, pw: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + pw)


def test_auth_plain_login_and_sender_ownership():
    d = Dialog(mode="submission", ip="192.0.2.7", tls=True)
    assert "250 AUTH PLAIN LOGIN" in d.send(b"EHLO c\r\n")
    assert d.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["235 2.7.0"]
    assert d.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["503 5.5.1"]
    assert d.codes(b"MAIL FROM:<bob@example.com>\r\n") == ["553 5.7.1"]
    assert d.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@y.test>\r\n") == ["250 2.1.0", "250 2.1.5"]
    assert d.codes(b"DATA\r\nFrom: Bob <bob@example.com>\r\n\r\nx\r\n.\r\n") == ["354 End", "553 5.7.1"]
    assert d.codes(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"
                   b"From: Alice <ALICE@example.com>\r\n\r\nx\r\n.\r\n")[-1] == "250 2.0.0"
    assert d.sink.messages[-1][0].auth_user == "alice"
    assert b"with ESMTPSA id" in d.sink.messages[-1][1]


def test_auth_login_exchange_and_abort():
    d = Dialog(mode="smtps", ip="192.0.2.7", tls=True)
    d.send(b"EHLO c\r\n")
    assert d.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert d.send(base64.b64encode(b"alice") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert d.codes(b"*\r\n") == ["501 5.7.0"]
    assert d.send(b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert d.codes(base64.b64encode(b"secret") + b"\r\n") == ["235 2.7.0"]


@pytest.mark.parametrize("line,expected", [
    (b"AUTH\r\n", "501 5.5.4"),  # twisted.mail drops the connection on this
    (b"AUTH PLAIN !!!notbase64\r\n", "501 5.5.2"),
    (b"AUTH PLAIN " + base64.b64encode(b"only-one-part") + b"\r\n", "501 5.5.2"),
    (b"AUTH CRAM-MD5\r\n", "504 5.5.4"),
])
def test_malformed_auth_gets_a_reply(line, expected):
    d = Dialog(mode="submission", tls=True)
    d.send(b"EHLO c\r\n")
    assert d.codes(line) == [expected]
    assert d.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_bad_password_then_lockout_and_backend_down():
    d = Dialog(mode="submission", ip="192.0.2.7", tls=True)
    d.send(b"EHLO c\r\n")
    assert d.codes(b"AUTH PLAIN " + plain(b"alice", b"wrong") + b"\r\n") == ["535 5.7.8"]
    assert d.codes(b"AUTH PLAIN " + plain(b"nobody", b"x") + b"\r\n") == ["535 5.7.8"]
    assert d.codes(b"AUTH PLAIN " + plain(b"alice", b"wrong") + b"\r\n") == ["421 4.7.0"]
    assert d.transport.disconnecting
    # A new session from the same address is refused at AUTH for a while.
    d2 = Dialog(mode="submission", ip="192.0.2.7", tls=True, clock=d.clock)
    d2.context.throttle = d.context.throttle
    d2.send(b"EHLO c\r\n")
    assert d2.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["421 4.7.0"]
    d3 = Dialog(mode="submission", tls=True)
    d3.checker.down = True
    d3.send(b"EHLO c\r\n")
    assert d3.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["454 4.7.0"]


@pytest.mark.parametrize("data,expected", [
    (b"MAIL FROM:<a@x.test> SIZE=36700161\r\n", "552 5.3.4"),
    (b"MAIL FROM:<a@x.test> SIZE=abc\r\n", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n", "555 5.5.4"),
    (b"MAIL FROM:<a@x.test> SMTPUTF8\r\n", "555 5.6.7"),
    (b"MAIL FROM:<a@x.test> RET=HDRS\r\n", "555 5.5.4"),
    (b"MAIL FROM:<j\xc3\xb6@x.test>\r\n", "553 5.6.7"),
    (b'MAIL FROM:<"a\rb"@x.test>\r\n', "501 5.5.4"),
    (b"MAIL FROM <a@x.test>\r\n", "501 5.1.7"),
    (b"RCPT TO:<a@x.test>\r\n", "503 5.5.1"),
    (b"DATA\r\n", "503 5.5.1"),
    (b"BDAT 10 LAST\r\n", "502 5.5.1"),
    (b"EXPN staff\r\n", "502 5.5.1"),
    (b"VRFY bob\r\n", "252 2.5.2"),
    (b"HELP\r\n", "214 2.0.0"),
    (b"FOO bar\r\n", "500 5.5.2"),
    (b"STARTTLS\r\n", "454 4.7.0"),
    (b"X" * 3000 + b"\r\n", "500 5.5.6"),
])
def test_command_replies(data, expected):
    d = Dialog()
    d.send(b"EHLO c\r\n")
    assert d.codes(data) == [expected]


def test_mail_before_helo_and_nested_mail():
    d = Dialog()
    assert d.codes(b"MAIL FROM:<a@x.test>\r\n") == ["503 5.5.1"]
    d.send(b"HELO c\r\n")
    assert d.codes(b"MAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n") == ["250 2.1.0", "503 5.5.1"]
    assert d.codes(b"RSET\r\nMAIL FROM:<a@x.test>\r\n") == ["250 2.0.0", "250 2.1.0"]


def test_long_command_without_newline_is_discarded_once():
    d = Dialog()
    d.send(b"EHLO c\r\n")
    assert d.codes(b"A" * 5000) == ["500 5.5.6"]
    assert d.codes(b"B" * 5000) == []
    assert d.codes(b"tail\r\nNOOP\r\n") == ["250 2.0.0"]


def test_recipient_limit():
    d = Dialog(limits=LimitsSection(max_recipients=2))
    d.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert d.codes(b"RCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\n") == [
        "250 2.1.5", "250 2.1.5", "452 4.5.3"]
    d.send(b"DATA\r\nx\r\n.\r\n")
    assert d.sink.messages[0][0].recipients == ("1@y.test", "2@y.test")


def test_long_data_line_refused_after_end_of_data_no_command_fallback():
    d = Dialog()
    d.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    stream = b"DATA\r\n" + b"x" * 20000 + b"\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n.\r\nNOOP\r\n"
    assert d.codes(stream) == ["354 End", "550 5.6.0", "250 2.0.0"]
    assert d.sink.messages == []


def test_bare_lf_policy_reject_and_normalize():
    d = Dialog(limits=LimitsSection(bare_line_ending="reject"))
    d.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert d.codes(b"DATA\r\nline\nother\r\n.\r\n") == ["354 End", "550 5.6.0"]
    d2 = Dialog()
    d2.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert d2.codes(b"DATA\r\nline\n.\nother\r\n.\r\n")[-1] == "250 2.0.0"
    assert d2.sink.messages[0][1].endswith(b"\r\nline\r\n.\r\nother\r\n")


def test_message_size_limit_at_end_of_data():
    d = Dialog(limits=LimitsSection(max_message_size=1000))
    d.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert d.codes(b"DATA\r\n" + (b"y" * 100 + b"\r\n") * 20 + b".\r\n") == ["354 End", "552 5.3.4"]


def test_error_limit_ends_session_with_421():
    d = Dialog(limits=LimitsSection(max_errors=3))
    d.send(b"EHLO c\r\n")
    assert d.codes(b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n") == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert d.transport.disconnecting


def test_idle_timeout_and_session_deadline():
    d = Dialog(limits=LimitsSection(idle_timeout=10, session_timeout=25))
    d.clock.advance(9)
    d.send(b"NOOP\r\n")
    d.clock.advance(9)
    assert not d.transport.disconnecting
    d.clock.advance(2)
    assert d.codes(b"") == ["421 4.4.2"] and d.transport.disconnecting
    e = Dialog(limits=LimitsSection(idle_timeout=10, session_timeout=25))
    for _ in range(3):
        e.clock.advance(8)
        e.send(b"NOOP\r\n")
    e.clock.advance(2)
    assert e.codes(b"") == ["421 4.4.2"] and e.transport.disconnecting


def test_connection_limits():
    counter = ConnectionCounter(100, 2)
    a, b = Dialog(connections=counter), Dialog(connections=counter)
    c = Dialog(connections=counter)
    assert c.greeting == ["421 4.7.0 Too many connections from your address, try again later"]
    assert c.transport.disconnecting
    a.proto.connectionLost(None)
    assert Dialog(connections=counter).greeting[0].startswith("220 ")
    assert b.greeting[0].startswith("220 ")


def test_non_ascii_helo_is_echoed_safely():
    d = Dialog()
    lines = d.send("EHLO h\u00e9llo\r\n".encode() + b"EHLO \xff\xfe\r\n")
    assert lines[0] == "250-gw.example.test Hello h?llo [127.0.0.1]"
    assert any(line.startswith("250-gw.example.test Hello ??") for line in lines[1:])
    d.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n")
    assert d.sink.messages[0][1].startswith(b"Received: from ?? ([127.0.0.1])")


def test_input_held_while_busy_pauses_reading_past_a_bound():
    sink = RecordingSink(manual=True)
    d = Dialog(sink=sink)
    d.send(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\n")
    assert d.transport.producerState == "producing"  # a little pipelined input: no pause
    d.send(b"NOOP\r\n" * 60000)  # 360 KB held while the spool works
    assert d.transport.producerState == "paused"
    sink.pending[0].callback(None)
    assert d.codes(b"")[:2] == ["250 2.0.0", "250 2.0.0"]
    assert d.transport.producerState == "producing"
