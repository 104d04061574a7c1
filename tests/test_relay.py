"""gateway.relay against FakeSmarthost over real sockets and real TLS."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from fakesmarthost import FakeSmarthost
from gateway.config import RelaySection, SmarthostSection
from gateway.delivery import AttemptResult, Outcome
from gateway.envelope import Envelope, new_queue_id
from gateway.relay import REPLY_VERDICTS, SmarthostRelay, classify_error, classify_reply
from gateway.smtpclient import ClientReply, ClientTimeout, to_wire

FAST = RelaySection(connect_timeout=5, greeting_timeout=5, command_timeout=5, data_timeout=5)
MESSAGE = b"From: a@example.test\r\nTo: x@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def envelope(*recipients: str, sender: str = "a@example.test", body_8bit: bool = False
             ) -> Envelope:
    return Envelope(new_queue_id(), sender, recipients or ("x@example.test",), time.time(),
                    body_8bit=body_8bit)


@pytest_twisted.async_yield_fixture()
async def env(test_ca, server_cert):
    """Makes sinks and relays; stops them all (and waits for their connections) after."""
    from twisted.internet import reactor

    class Env:
        def __init__(self) -> None:
            self.sinks: list[FakeSmarthost] = []
            self.relays: list[SmarthostRelay] = []
            self.reactor = reactor

        async def sink(self, **kw: Any) -> tuple[FakeSmarthost, int]:
            if kw.get("security", "none") != "none":
                kw.setdefault("cert", server_cert)
            fs = FakeSmarthost(reactor, **kw)
            self.sinks.append(fs)
            return fs, await fs.start()

        def host(self, port: int, security: str = "none", **kw: Any) -> SmarthostSection:
            if security != "none":
                kw.setdefault("ca_file", test_ca.ca_pem)
                kw.setdefault("tls_name", "localhost")
            return SmarthostSection(host="127.0.0.1", port=port, security=security, **kw)

        def relay(self, *hosts: SmarthostSection, cfg: RelaySection = FAST) -> SmarthostRelay:
            relay = SmarthostRelay(hosts, cfg, "gw.example.test", reactor)
            self.relays.append(relay)
            return relay

        async def closed_port(self) -> int:
            from twisted.internet.protocol import Factory
            port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
            number = port.getHost().port
            await port.stopListening()
            return number

    e = Env()
    yield e
    for relay in e.relays:
        await relay.wait_closed()
    for fs in e.sinks:
        await fs.stop()
    assert [c for c in reactor.getDelayedCalls() if "gateway" in repr(c.func)] == []


def outcomes(result: AttemptResult) -> dict[str, Outcome]:
    return {r.recipient: r.outcome for r in result.results}


# --- the three security modes ----------------------------------------------------------

@pytest.mark.parametrize("security", ["smtps", "starttls", "none"])
@pytest_twisted.ensureDeferred
async def test_delivery_per_security_mode(env, security):
    fs, port = await env.sink(security=security)
    result = await env.relay(env.host(port, security)).deliver(envelope(), MESSAGE)
    assert result.host == f"127.0.0.1:{port}"
    (r,) = result.results
    assert (r.outcome, r.code, r.host) == (Outcome.DELIVERED, 250, f"127.0.0.1:{port}")
    (got,) = fs.messages
    assert got.tls is (security != "none")
    assert got.helo == "gw.example.test"
    assert (got.mail_from, got.rcpt_to) == ("a@example.test", ["x@example.test"])
    assert got.mail_params == {"SIZE": str(len(MESSAGE))}
    assert got.data == MESSAGE and got.raw_data == to_wire(MESSAGE)
    if security == "starttls":
        assert fs.commands[:2] == [b"EHLO gw.example.test", b"STARTTLS"]


@pytest_twisted.ensureDeferred
async def test_auth_plain_after_starttls_and_password_never_logged(env):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        fs, port = await env.sink(security="starttls", users={"relayuser": "s3cret-pw"})
        relay = env.relay(env.host(port, "starttls", username="relayuser", password="s3cret-pw"))
        result = await relay.deliver(envelope(), MESSAGE)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert fs.messages[0].auth_user == "relayuser"
    verbs = [c.split(b" ")[0] for c in fs.commands]
    assert verbs[:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"]
    assert fs.commands[3].startswith(b"AUTH PLAIN ")
    attempts = [e for e in events if e.get("event") == "attempt"]
    assert [(e["recipient"], e["outcome"]) for e in attempts] == [("x@example.test", "delivered")]
    assert not any("s3cret-pw" in repr(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_auth_login_when_plain_is_not_offered(env):
    ehlo = "250 fake\n250 AUTH LOGIN\n250 SIZE 1000000"
    fs, port = await env.sink(security="smtps", users={"u": "p"}, responses={"ehlo": ehlo})
    relay = env.relay(env.host(port, "smtps", username="u", password="p"))
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert b"AUTH LOGIN" in fs.commands and fs.messages[0].auth_user == "u"


@pytest.mark.parametrize("message, body", [
    (MESSAGE, None),
    (MESSAGE.replace(b"Hello", b"H\xc3\xa9llo"), "8BITMIME"),
])
@pytest_twisted.ensureDeferred
async def test_body_8bitmime_only_for_8bit_messages(env, message, body):
    fs, port = await env.sink()
    await env.relay(env.host(port)).deliver(envelope(), message)
    assert fs.messages[0].mail_params.get("BODY") == body
    assert fs.messages[0].data == message


# --- per-recipient outcomes --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mixed_recipient_outcomes(env):
    fs, port = await env.sink(responses={"rcpt": {
        "bad@x.test": "550 5.1.1 no such user", "grey@x.test": "451 4.7.1 greylisted"}})
    result = await env.relay(env.host(port)).deliver(
        envelope("ok@x.test", "bad@x.test", "grey@x.test", "ok2@x.test"), MESSAGE)
    assert outcomes(result) == {"ok@x.test": Outcome.DELIVERED, "bad@x.test": Outcome.PERMFAIL,
                                "grey@x.test": Outcome.TEMPFAIL, "ok2@x.test": Outcome.DELIVERED}
    bad = result.results[1]
    assert (bad.code, bad.enhanced, bad.text, bad.host) == (
        550, "5.1.1", "no such user", f"127.0.0.1:{port}")
    assert fs.messages[0].rcpt_to == ["ok@x.test", "ok2@x.test"]


@pytest_twisted.ensureDeferred
async def test_no_data_when_every_recipient_is_refused(env):
    fs, port = await env.sink(responses={"rcpt": "550 5.1.1 no"})
    fs2, port2 = await env.sink()
    result = await env.relay(env.host(port), env.host(port2)).deliver(
        envelope("a@x.test", "b@x.test"), MESSAGE)
    assert set(outcomes(result).values()) == {Outcome.PERMFAIL}
    assert b"DATA" not in fs.commands and fs2.connections == 0


@pytest.mark.parametrize("reply, outcome", [
    ("451 4.3.0 try later", Outcome.TEMPFAIL),
    ("554 5.6.0 content rejected", Outcome.PERMFAIL),
])
@pytest_twisted.ensureDeferred
async def test_final_data_reply_decides_accepted_recipients(env, reply, outcome):
    fs, port = await env.sink(responses={"data_end": reply,
                                         "rcpt": {"bad@x.test": "550 5.1.1 no"}})
    fs2, port2 = await env.sink()
    result = await env.relay(env.host(port), env.host(port2)).deliver(
        envelope("a@x.test", "bad@x.test"), MESSAGE)
    assert outcomes(result) == {"a@x.test": outcome, "bad@x.test": Outcome.PERMFAIL}
    assert result.results[0].text == reply[10:]
    assert fs2.connections == 0  # no failover after the message was answered


@pytest_twisted.ensureDeferred
async def test_mail_5xx_bounces_everyone_without_failover(env):
    fs, port = await env.sink(responses={"mail": "550 5.7.1 sender refused"})
    fs2, port2 = await env.sink()
    result = await env.relay(env.host(port), env.host(port2)).deliver(
        envelope("a@x.test", "b@x.test"), MESSAGE)
    assert set(outcomes(result).values()) == {Outcome.PERMFAIL}
    assert result.results[0].describe() == "550 5.7.1 sender refused"
    assert fs2.connections == 0


# --- failover ------------------------------------------------------------------------

@pytest.mark.parametrize("responses, drop_after", [
    ({"greeting": "421 4.3.2 busy"}, None),
    ({"greeting": "554 5.7.1 go away"}, None),
    ({"ehlo": "451 4.3.0 later"}, None),
    ({"mail": "451 4.3.0 later"}, None),
    ({"mail": "530 5.7.0 Authentication required"}, None),
    ({"rcpt": "421 4.3.2 closing"}, None),
    ({"data": "451 4.3.0 later"}, None),
    ({"data_end": "421 4.3.2 shutting down"}, None),
    ({}, "mail"),
    ({}, "greeting"),
])
@pytest_twisted.ensureDeferred
async def test_session_failure_on_first_host_uses_second(env, responses, drop_after):
    fs, port = await env.sink(responses=responses, drop_after=drop_after)
    fs2, port2 = await env.sink()
    result = await env.relay(env.host(port), env.host(port2)).deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert result.host == result.results[0].host == f"127.0.0.1:{port2}"
    assert len(fs2.messages) == 1 and all(not m.accepted for m in fs.messages)


@pytest_twisted.ensureDeferred
async def test_session_failure_on_last_host_is_tempfail(env):
    fs, port = await env.sink(responses={"greeting": "554 5.7.1 go away"})
    result = await env.relay(env.host(port)).deliver(envelope("a@x.test", "b@x.test"), MESSAGE)
    assert set(outcomes(result).values()) == {Outcome.TEMPFAIL}
    assert result.results[0].describe() == "554 5.7.1 go away"


@pytest_twisted.ensureDeferred
async def test_refused_port_uses_next_host(env):
    dead = await env.closed_port()
    fs2, port2 = await env.sink(security="smtps")
    result = await env.relay(env.host(dead, "smtps"), env.host(port2, "smtps")).deliver(
        envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert result.host == f"127.0.0.1:{port2}"


@pytest_twisted.ensureDeferred
async def test_all_hosts_down_is_tempfail_for_everyone(env):
    dead1, dead2 = await env.closed_port(), await env.closed_port()
    result = await env.relay(env.host(dead1), env.host(dead2)).deliver(
        envelope("a@x.test", "b@x.test"), MESSAGE)
    assert set(outcomes(result).values()) == {Outcome.TEMPFAIL}
    assert result.host == ""
    for r in result.results:
        assert (r.code, r.host) == (0, "")
        assert f"127.0.0.1:{dead2}" in r.text and "refused" in r.text.lower()


@pytest.mark.parametrize("security", ["smtps", "starttls"])
@pytest_twisted.ensureDeferred
async def test_name_mismatch_on_first_host_uses_second_and_sends_nothing(env, security):
    fs, port = await env.sink(security=security)
    fs2, port2 = await env.sink(security=security)
    relay = env.relay(env.host(port, security, tls_name="smtp.wrong.test"),
                      env.host(port2, security))
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert result.host == f"127.0.0.1:{port2}"
    assert fs.commands == ([] if security == "smtps" else [b"EHLO gw.example.test",
                                                             b"STARTTLS"])
    assert fs.messages == []


@pytest.mark.parametrize("security", ["smtps", "starttls"])
@pytest_twisted.ensureDeferred
async def test_san_less_certificate_is_refused(env, test_ca, security):
    nosan = test_ca.issue("relay-nosan", san=False, common_name="localhost")
    fs, port = await env.sink(security=security, cert=nosan)
    result = await env.relay(env.host(port, security)).deliver(envelope(), MESSAGE)
    (r,) = result.results
    assert r.outcome is Outcome.TEMPFAIL and "TLS failure" in r.text
    assert "subjectAltName" in r.text
    assert fs.commands == ([] if security == "smtps" else [b"EHLO gw.example.test",
                                                             b"STARTTLS"])
    assert fs.messages == []


@pytest_twisted.ensureDeferred
async def test_starttls_missing_never_falls_back_to_plaintext(env):
    fs, port = await env.sink(security="none", users={"u": "p"})
    relay = env.relay(env.host(port, "starttls", username="u", password="p"))
    result = await relay.deliver(envelope(), MESSAGE)
    (r,) = result.results
    assert r.outcome is Outcome.TEMPFAIL and "STARTTLS" in r.text
    assert fs.commands == [b"EHLO gw.example.test"]


@pytest_twisted.ensureDeferred
async def test_auth_5xx_tries_next_host_and_never_bounces(env):
    fs, port = await env.sink(security="smtps", users={"u": "other"})
    fs2, port2 = await env.sink(security="smtps", users={"u": "p"})
    one = env.relay(env.host(port, "smtps", username="u", password="p"))
    alone = await one.deliver(envelope(), MESSAGE)
    assert alone.results[0].outcome is Outcome.TEMPFAIL
    assert alone.results[0].code == 535
    both = env.relay(env.host(port, "smtps", username="u", password="p"),
                     env.host(port2, "smtps", username="u", password="p"))
    result = await both.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert fs.messages == [] and fs2.messages[0].auth_user == "u"


# --- deadlines and cancellation ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stall_at_data_end_hits_the_data_deadline(env):
    fs, port = await env.sink(stall_at="data_end")
    cfg = RelaySection(connect_timeout=5, greeting_timeout=5, command_timeout=5,
                       data_timeout=0.5)
    started = time.monotonic()
    result = await env.relay(env.host(port), cfg=cfg).deliver(envelope(), MESSAGE)
    assert 0.4 < time.monotonic() - started < 4
    (r,) = result.results
    assert r.outcome is Outcome.TEMPFAIL and "0.5s" in r.text and r.code == 0
    assert fs.count == 1 and not fs.messages[0].accepted
    await fs.wait_closed()


@pytest_twisted.ensureDeferred
async def test_stall_at_greeting_hits_the_greeting_deadline(env):
    fs, port = await env.sink(stall_at="greeting")
    fs2, port2 = await env.sink()
    cfg = RelaySection(connect_timeout=5, greeting_timeout=0.3, command_timeout=5,
                       data_timeout=5)
    result = await env.relay(env.host(port), env.host(port2), cfg=cfg).deliver(
        envelope(), MESSAGE)
    assert result.host == f"127.0.0.1:{port2}" and len(fs2.messages) == 1


@pytest_twisted.ensureDeferred
async def test_cancel_aborts_the_connection(env):
    fs, port = await env.sink(stall_at="data_end")
    slow = RelaySection(connect_timeout=60, greeting_timeout=60, command_timeout=60,
                        data_timeout=60)
    d = env.relay(env.host(port), cfg=slow).deliver(envelope(), MESSAGE)
    await fs.wait_for_messages(1)
    assert fs.open_connections == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await fs.wait_closed().addTimeout(2, env.reactor)  # the abort, not a deadline
    assert fs.open_connections == 0


# --- dot-stuffing and smuggling ---------------------------------------------------------

def dotted_message() -> bytes:
    """Lines starting with "." at the very start, at many offsets, and at 16384*k."""
    out = bytearray(b".first line starts with a dot\r\n")
    for k in range(1, 5):
        boundary = 16384 * k
        while len(out) < boundary - 80:
            out += b"x" * 70 + b"\r\n"
        pad = boundary - len(out) - 2
        out += b"y" * pad + b"\r\n"
        assert len(out) == boundary
        out += b".\r\n" if k % 2 else b"..double\r\n"
        out += b".line right after\r\n"
    out += b"end\r\n.\r\n"  # a last line that is just a dot
    return bytes(out)


@pytest_twisted.ensureDeferred
async def test_dot_lines_arrive_byte_identical(env):
    message = dotted_message()
    fs, port = await env.sink(security="smtps")
    result = await env.relay(env.host(port, "smtps")).deliver(envelope(), message)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    (got,) = fs.messages
    assert got.data == message
    assert got.raw_data == to_wire(message)
    assert got.raw_data.startswith(b"..first")


@pytest_twisted.ensureDeferred
async def test_smuggling_attempt_is_one_message(env):
    head = b"Subject: smuggle\r\n\r\n"
    filler = b"z" * (16384 - len(head) - 2) + b"\r\n"
    smuggled = (b".\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nowned\r\n.\r\nQUIT\r\n")
    message = head + filler + smuggled
    assert message.index(b".\r\nMAIL") == 16384
    fs, port = await env.sink()
    result = await env.relay(env.host(port)).deliver(envelope(), message)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert fs.count == 1 and fs.messages[0].data == message
    assert [c for c in fs.commands if c.startswith(b"MAIL")] == [b"MAIL FROM:<a@example.test> "
                                                                 + f"SIZE={len(message)}".encode()]


@pytest_twisted.ensureDeferred
async def test_non_canonical_message_is_not_sent(env):
    fs, port = await env.sink()
    result = await env.relay(env.host(port)).deliver(envelope(), b"bare\nlf\r\n")
    assert result.results[0].outcome is Outcome.TEMPFAIL
    assert fs.connections == 0


# --- the classification table (pure) ---------------------------------------------------------

@pytest.mark.parametrize("stage, code, outcome, failover", [
    ("greeting", 421, Outcome.TEMPFAIL, True),
    ("greeting", 554, Outcome.TEMPFAIL, True),
    ("ehlo", 550, Outcome.TEMPFAIL, True),
    ("auth", 535, Outcome.TEMPFAIL, True),
    ("auth", 454, Outcome.TEMPFAIL, True),
    ("mail", 451, Outcome.TEMPFAIL, True),
    ("mail", 550, Outcome.PERMFAIL, False),
    ("mail", 530, Outcome.TEMPFAIL, True),
    ("rcpt", 450, Outcome.TEMPFAIL, False),
    ("rcpt", 550, Outcome.PERMFAIL, False),
    ("rcpt", 421, Outcome.TEMPFAIL, True),
    ("data", 451, Outcome.TEMPFAIL, True),
    ("data", 554, Outcome.PERMFAIL, False),
    ("data_end", 451, Outcome.TEMPFAIL, False),
    ("data_end", 552, Outcome.PERMFAIL, False),
    ("data_end", 421, Outcome.TEMPFAIL, True),
    ("data", 250, Outcome.TEMPFAIL, True),  # success code where 354 was due
])
def test_classify_reply(stage, code, outcome, failover):
    verdict = classify_reply(stage, ClientReply(code, "", ("x",)))
    assert (verdict.outcome, verdict.failover) == (outcome, failover)


def test_misconfiguration_is_flagged_and_unknown_errors_are_temporary():
    assert classify_reply("auth", ClientReply(535, "5.7.8", ("no",))).misconfigured
    assert not classify_reply("greeting", ClientReply(421, "", ("busy",))).misconfigured
    assert all(v.outcome is not Outcome.DELIVERED for v in REPLY_VERDICTS.values())
    for exc in (RuntimeError("bug"), ClientTimeout("greeting", 1.0)):
        verdict = classify_error("greeting", exc)
        assert verdict.outcome is Outcome.TEMPFAIL and verdict.failover
