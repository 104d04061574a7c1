"""The rate limiter in memory: rules, GCRA windows, leases, overrides, replies, and the
listener's stages driven over a StringTransport, all on a task.Clock."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides

from gateway.auth import AuthThrottle, Principal, SenderPolicy, make_portal
from gateway.config import LimitsSection, parse_config
from gateway.config_values import ConfigError
from gateway.envelope import Address
from gateway.listener import ConnectionCounter, ListenerContext, ListenerSettings
from gateway.ratelimit import LEASE_TTL, Bucket, Lease, RateLimiter, Refusal, Slot
from gateway.ratelimit_local import LocalStore
from gateway.smtpd import GatewaySMTPFactory
from test_smtpd_memory import TRUSTED, FixedChecker, RecordingSink

BASE = {"listeners": [{"endpoint": "tcp:2525", "mode": "smtp"}],
        "smarthosts": [{"host": "smtp.example.test"}]}


def ratelimit(**section):
    return parse_config({**BASE, "ratelimit": section}, base_dir=Path.cwd()).ratelimit


def rule(dimension, key, limit, window=None):
    out = {"dimension": dimension, "key": key, "limit": limit}
    if window is not None:
        out["window"] = window
    return out


def now(d):
    out = []
    d.addBoth(out.append)
    assert out, "the in-process store answers at once"
    return out[0]


def alice(cls=None):
    return Principal("alice", "file", True, SenderPolicy(("*",)),
                     {"class": cls} if cls else {})


# --- the store: GCRA, all-or-nothing, leases ------------------------------------------

def test_gcra_burst_then_one_per_interval_and_window_roll_over():
    clock = task.Clock()
    store = LocalStore(clock)
    b = Bucket("m", limit=3, window=60, cost=1)
    assert [now(store.take([b])).refused for _ in range(3)] == [None, None, None]
    refused = now(store.take([b]))
    assert refused.refused == 0 and refused.retry_after == pytest.approx(20)
    clock.advance(19.9)
    assert now(store.take([b])).refused == 0
    clock.advance(0.1)                      # one unit back per window/limit
    assert now(store.take([b])).refused is None
    assert now(store.take([b])).refused == 0
    clock.advance(60)                       # a whole window later: the full burst again
    assert [now(store.take([b])).refused for _ in range(4)] == [None, None, None, 0]


def test_take_is_all_or_nothing_and_reports_the_longest_wait():
    clock = task.Clock()
    store = LocalStore(clock)
    minute, hour = Bucket("min", 2, 60, 1), Bucket("hour", 1, 3600, 1)
    assert now(store.take([minute, hour])).refused is None
    answer = now(store.take([minute, hour]))
    assert answer.refused == 1 and answer.retry_after == pytest.approx(3600)
    # the refused check charged nothing: the minute bucket still has one unit
    assert now(store.take([minute])).refused is None


def test_leases_count_release_and_expire_without_refresh():
    clock = task.Clock()
    store = LocalStore(clock)
    slot = Slot("conn:ip:192.0.2.1", 2)
    assert now(store.acquire([slot], "a")).refused is None
    assert now(store.acquire([slot], "b")).refused is None
    assert now(store.acquire([slot], "c")).refused == 0
    now(store.release([slot], "a"))
    assert now(store.acquire([slot], "c")).refused is None
    clock.advance(LEASE_TTL / 2)
    now(store.refresh([([slot], "b")]))     # b is kept alive, c is not
    clock.advance(LEASE_TTL / 2 + 1)
    assert now(store.acquire([slot], "d")).refused is None
    assert now(store.acquire([slot], "e")).refused == 0


# --- the policy: keys, overrides, replies ----------------------------------------------

def test_mail_reply_names_the_limit_and_the_wait():
    clock = task.Clock()
    rl = RateLimiter(ratelimit(rules=[rule("messages", "user", 2, "1h")]), LocalStore(clock), clock)
    subject = rl.subject("192.0.2.1", alice(), Address("alice", "example.com"))
    assert now(rl.mail(subject, None)) is None
    assert now(rl.mail(subject, None)) is None
    refusal = now(rl.mail(subject, None))
    assert isinstance(refusal, Refusal)
    assert refusal.reply.encode() == (b"451 4.7.1 rate limit: user alice may send 2 messages"
                                      b" per hour; try again in 1800 s\r\n")
    clock.advance(1800)
    assert now(rl.mail(subject, None)) is None
    # a client without AUTH has no user key: the rule does not apply to it
    anonymous = rl.subject("192.0.2.1", None, Address("x", "example.com"))
    assert all(now(rl.mail(anonymous, None)) is None for _ in range(5))


def test_overrides_per_user_then_per_class():
    section = ratelimit(rules=[rule("messages", "user", 1, "1h"), rule("messages", "ip", 100, "1h")],
                        overrides=[{"user_class": "bulk", "dimension": "messages",
                                    "window": "1h", "limit": 5},
                                   {"user": "alice", "dimension": "messages",
                                    "window": "1h", "limit": 3}])
    clock = task.Clock()
    rl = RateLimiter(section, LocalStore(clock), clock)
    user_rule, ip_rule = section.rules
    bob = Principal("bob", "file", True, SenderPolicy(("*",)), {"class": "bulk"})
    assert rl.limit_for(user_rule, rl.subject("192.0.2.1", alice("bulk"))) == 3
    assert rl.limit_for(user_rule, rl.subject("192.0.2.1", bob)) == 5
    assert rl.limit_for(ip_rule, rl.subject("192.0.2.1", bob)) == 100
    subject = rl.subject("192.0.2.1", alice("bulk"))
    assert [now(rl.mail(subject, None)) is None for _ in range(4)] == [True] * 3 + [False]


def test_bytes_charged_at_mail_with_size_and_domains_and_networks():
    section = ratelimit(rules=[rule("bytes", "sender_domain", "1M", "1h"),
                               rule("recipients", "rcpt_domain", 2, "1m"),
                               rule("messages", "net", 2, "1m")])
    clock = task.Clock()
    rl = RateLimiter(section, LocalStore(clock), clock)
    sender = Address("a", "Example.COM")
    s1 = rl.subject("192.0.2.1", None, sender)
    assert now(rl.mail(s1, 600 * 1024)) is None
    refusal = now(rl.data(s1, 600 * 1024))   # same domain, any sender: 1.2M > 1M
    assert "sender domain example.com may send 1048576 bytes per hour" in refusal.reply.text
    # the /24 is shared by .1 and .2; another /24 is not
    assert now(rl.mail(rl.subject("192.0.2.2", None, Address("b", "x.test")), None)) is None
    assert now(rl.mail(rl.subject("192.0.2.3", None, Address("b", "x.test")), None)) is not None
    assert now(rl.mail(rl.subject("198.51.100.1", None, Address("b", "x.test")), None)) is None
    to = [rl.subject("192.0.2.1", None, sender, Address("r", d))
          for d in ("y.test", "y.test", "y.test", "z.test")]
    assert [now(rl.rcpt(s)) is None for s in to] == [True, True, False, True]


def test_outbound_rate_and_connection_cap():
    clock = task.Clock()
    rl = RateLimiter(ratelimit(outbound_messages_per_second=2, outbound_connections=1),
                     LocalStore(clock), clock)
    first = now(rl.outbound())
    assert first.granted
    second = now(rl.outbound())
    assert not second.granted               # one connection at a time
    first.release()
    assert now(rl.outbound()).granted       # (and the rate allowed 2 at once)
    nxt = now(rl.outbound())
    assert not nxt.granted and 0 < nxt.retry_after <= 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"ratelimit.rules\[0\].window: required"):
        ratelimit(rules=[rule("messages", "user", 1)])
    with pytest.raises(ConfigError, match=r"ratelimit.rules\[0\].key: connections"):
        ratelimit(rules=[rule("connections", "user", 1)])
    with pytest.raises(ConfigError, match=r"ratelimit.overrides\[0\]: no \[\[ratelimit.rules"):
        ratelimit(overrides=[{"user": "a", "dimension": "messages", "window": "1h", "limit": 1}])
    with pytest.raises(ConfigError, match=r"ratelimit.redis: never put a password"):
        ratelimit(redis="redis://:secret@127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match=r"ratelimit.fail_mode: fail_closed needs redis"):
        ratelimit(fail_mode="fail_closed")
    assert ratelimit(rules=[rule("bytes", "user", "10M", "1d")]).rules[0].limit == 10 * 1024**2


# --- the listener's stages --------------------------------------------------------------

class Session:
    def __init__(self, limiter, clock, ip="127.0.0.1", tls=False):
        settings = ListenerSettings(name="smtp", mode="smtp", hostname="gw.example.test",
                                    limits=LimitsSection(idle_timeout=7200, session_timeout=7200),
                                    trusted_networks=TRUSTED)
        self.checker = FixedChecker()
        self.context = ListenerContext(
            settings=settings, clock=clock, portal=make_portal([self.checker]),
            starttls_creator=None, sink=RecordingSink(),
            throttle=AuthThrottle(3, 300, store=limiter.store),
            connections=ConnectionCounter(100, 100), limiter=limiter)
        self.proto = GatewaySMTPFactory(self.context).buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        if tls:
            alsoProvides(self.transport, ISSLTransport)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.proto.dataReceived(data)
        out = self.transport.value().decode()
        self.transport.clear()
        return [line for line in out.split("\r\n") if line and line[3:4] == " "]


def test_smtp_stages_pipelined_refusals_are_4xx_in_order():
    clock = task.Clock()
    section = ratelimit(rules=[rule("messages", "ip", 2, "1h"), rule("recipients", "ip", 2, "1h"),
                               rule("bytes", "ip", 2000, "1h")])
    rl = RateLimiter(section, LocalStore(clock), clock)
    s = Session(rl, clock)
    assert s.send(b"")[0].startswith("220 ")
    s.send(b"EHLO c\r\n")
    body = (b"x" * 98 + b"\r\n") * 15    # 1500 bytes
    replies = s.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n"
                     b"RCPT TO:<d@y.test>\r\nDATA\r\n" + body + b".\r\n"
                     b"MAIL FROM:<a@x.test>\r\nRCPT TO:<e@y.test>\r\nRSET\r\n"
                     b"MAIL FROM:<a@x.test>\r\n")
    assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "451 4.7.1",
                                        "354 End d", "250 2.0.0", "250 2.1.0", "451 4.7.1",
                                        "250 2.0.0", "451 4.7.1"]
    assert replies[3].endswith("address 127.0.0.1 may send to 2 recipients per hour;"
                               " try again in 1800 s")
    assert replies[9].endswith("may send 2 messages per hour; try again in 1800 s")
    assert len(s.context.sink.messages) == 1
    clock.advance(3600)                     # the windows roll over
    replies = s.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" + body
                     + b".\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
                     + body[:1000] + b".\r\n")
    assert [r[:3] for r in replies] == ["250", "250", "354", "250", "250", "250", "354", "451"]
    assert "may send 2000 bytes per hour" in replies[7]   # 1500 + 1000 > 2000
    assert len(s.context.sink.messages) == 2


def test_connection_limit_421_then_release_on_disconnect():
    clock = task.Clock()
    rl = RateLimiter(ratelimit(rules=[rule("connections", "ip", 1)]), LocalStore(clock), clock)
    first = Session(rl, clock)
    assert first.send(b"")[0].startswith("220 ")
    second = Session(rl, clock)
    assert second.send(b"") == ["421 4.7.0 rate limit: address 127.0.0.1 may open 1"
                                " connections at once; try again later"]
    assert second.transport.disconnecting
    first.proto.connectionLost(None)
    assert isinstance(first.proto._lease, type(None))
    third = Session(rl, clock)
    assert third.send(b"")[0].startswith("220 ")
    assert isinstance(third.proto._lease, Lease)


def test_auth_failures_throttled_through_the_limiter_store():
    clock = task.Clock()
    rl = RateLimiter(ratelimit(), LocalStore(clock), clock)
    codes = []
    for _ in range(4):
        s = Session(rl, clock, ip="192.0.2.7", tls=True)
        s.send(b"EHLO c\r\n")
        bad = base64.b64encode(b"\0alice\0wrong")
        codes.append(s.send(b"AUTH PLAIN " + bad + b"\r\n")[-1][:9])
    assert codes == ["535 5.7.8", "535 5.7.8", "421 4.7.0", "421 4.7.0"]
    clock.advance(301)
    s = Session(rl, clock, ip="192.0.2.7", tls=True)
    s.send(b"EHLO c\r\n")
    ok = base64.b64encode(b"\0alice\0secret")
    assert s.send(b"AUTH PLAIN " + ok + b"\r\n")[-1].startswith("235 ")
