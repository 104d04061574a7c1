"""Failover, failback, breakers, fallback ports and connection reuse, over real sockets:
several FakeSmarthosts with TLS from the test CA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

import test_relay
from gateway.breaker import State
from gateway.config import SmarthostFallback
from gateway.delivery import Outcome
from test_relay import FAST, MESSAGE, envelope, outcomes

env = test_relay.env  # the fixture: sinks and relays, all stopped after each test


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor
    return defer.Deferred(lambda d: None).addTimeout(seconds, reactor).addErrback(
        lambda f: f.trap(defer.TimeoutError, defer.CancelledError) and None)


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def text(self) -> str:
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.events)


async def two(env, primary: dict | None = None, backup: dict | None = None,
              security: str = "smtps", **cfg):
    p, pport = await env.sink(security=security, **(primary or {}))
    b, bport = await env.sink(security=security, **(backup or {}))
    relay = env.relay(env.host(pport, security), env.host(bport, security),
                      cfg=replace(FAST, **cfg))
    return p, b, relay


@pytest_twisted.ensureDeferred
async def test_primary_down_backup_delivers(env):
    b, bport = await env.sink(security="smtps")
    relay = env.relay(env.host(await env.closed_port(), "smtps"), env.host(bport, "smtps"))
    result = await relay.deliver(envelope("x@example.test", "y@example.test"), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED,
                                "y@example.test": Outcome.DELIVERED}
    assert result.host == f"127.0.0.1:{bport}"
    assert len(b.messages) == 1 and b.messages[0].rcpt_to == ["x@example.test", "y@example.test"]


@pytest.mark.parametrize("primary", [
    {"responses": {"greeting": "421 4.3.2 too busy"}},
    {"responses": {"mail": "451 4.3.0 local problem"}},
    {"responses": {"ehlo": "421 4.7.0 go away"}},
    {"drop_after": "rcpt"},
])
@pytest_twisted.ensureDeferred
async def test_primary_421_or_451_goes_to_backup(env, primary):
    p, b, relay = await two(env, primary)
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert p.messages == [] and len(b.messages) == 1
    assert relay.stats.failovers[relay.smarthosts[0].address] == 1


@pytest_twisted.ensureDeferred
async def test_primary_550_on_one_recipient_bounces_only_that_one(env):
    p, b, relay = await two(env, {"responses": {"rcpt": {"bad@example.test": "550 5.1.1 unknown"}}})
    result = await relay.deliver(envelope("ok@example.test", "bad@example.test"), MESSAGE)
    assert outcomes(result) == {"ok@example.test": Outcome.DELIVERED,
                                "bad@example.test": Outcome.PERMFAIL}
    bad = next(r for r in result.results if r.recipient == "bad@example.test")
    assert (bad.code, bad.enhanced) == (550, "5.1.1")
    assert [m.rcpt_to for m in p.messages] == [["ok@example.test"]]
    assert b.connections == 0  # no failover for a recipient's 5xx
    assert relay.breakers[0].state is State.CLOSED


@pytest_twisted.ensureDeferred
async def test_both_down_is_tempfail_then_either_recovers(env):
    down = {"responses": {"greeting": "421 4.3.2 maintenance"}}
    p, b, relay = await two(env, dict(down), {"responses": dict(down["responses"])})
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.TEMPFAIL}
    b.responses.pop("greeting")  # the backup comes back first
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert len(b.messages) == 1


@pytest_twisted.ensureDeferred
async def test_breaker_skips_a_dead_primary_then_fails_back(env):
    p, b, relay = await two(env, {"responses": {"greeting": "421 4.3.2 down"}},
                            breaker_failures=2, breaker_cooldown=0.5)
    for _ in range(2):
        assert outcomes(await relay.deliver(envelope(), MESSAGE)) == {
            "x@example.test": Outcome.DELIVERED}
    assert relay.breakers[0].state is State.OPEN
    tried = p.connections
    for _ in range(3):  # open: the primary is not even tried
        await relay.deliver(envelope(), MESSAGE)
    assert p.connections == tried and len(b.messages) == 5
    p.responses.pop("greeting")  # the primary recovers
    await sleep(0.6)  # cool-down over: the next delivery probes it
    for _ in range(3):
        await relay.deliver(envelope(), MESSAGE)
    assert relay.breakers[0].state is State.CLOSED
    assert len(p.messages) == 3 and len(b.messages) == 5  # failback: all to the primary


@pytest_twisted.ensureDeferred
async def test_every_host_open_still_tries_them_in_order(env):
    p, b, relay = await two(env, {"responses": {"greeting": "421 4.3.2 down"}},
                            {"responses": {"greeting": "421 4.3.2 down"}},
                            breaker_failures=1, breaker_cooldown=3600)
    await relay.deliver(envelope(), MESSAGE)
    assert [br.state for br in relay.breakers] == [State.OPEN, State.OPEN]
    b.responses.pop("greeting")
    result = await relay.deliver(envelope(), MESSAGE)  # not stalled by the breakers
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert p.connections == 2 and len(b.messages) == 1


@pytest_twisted.ensureDeferred
async def test_connections_are_reused(env):
    fs, port = await env.sink(security="smtps")
    relay = env.relay(env.host(port, "smtps"))
    for i in range(30):
        result = await relay.deliver(envelope(f"r{i}@example.test"), MESSAGE)
        assert outcomes(result) == {f"r{i}@example.test": Outcome.DELIVERED}
    assert fs.count == 30 and fs.connections == 1
    verbs = [c.split(b" ")[0] for c in fs.commands]
    assert verbs.count(b"EHLO") == 1 and verbs.count(b"RSET") == 29
    # concurrent deliveries share at most max_connections_per_host connections
    relay2 = env.relay(env.host(port, "smtps"), cfg=replace(FAST, max_connections_per_host=3))
    results = await defer.gatherResults([relay2.deliver(envelope(), MESSAGE)
                                         for _ in range(40)])
    assert all(outcomes(r) == {"x@example.test": Outcome.DELIVERED} for r in results)
    assert fs.count == 70 and fs.connections - 1 <= 3


@pytest_twisted.ensureDeferred
async def test_messages_per_connection_cap(env):
    fs, port = await env.sink(security="none")
    relay = env.relay(env.host(port), cfg=replace(FAST, max_messages_per_connection=4))
    for _ in range(10):
        await relay.deliver(envelope(), MESSAGE)
    assert fs.count == 10 and fs.connections == 3


@pytest.mark.parametrize("response", [{"responses": {"rset": "421 4.4.2 idle too long"}},
                                      {"stall_at": "rset"}])
@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_is_replaced_without_failover(env, response):
    fs, port = await env.sink(security="none")
    b, bport = await env.sink(security="none")
    relay = env.relay(env.host(port), env.host(bport),
                      cfg=replace(FAST, command_timeout=0.5))
    await relay.deliver(envelope(), MESSAGE)
    for key, value in response.items():
        setattr(fs, key, value)
    result = await relay.deliver(envelope(), MESSAGE)  # RSET fails: a fresh connection
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert fs.count == 2 and fs.connections == 2 and b.connections == 0
    assert relay.stats.stale_reused == 1 and relay.breakers[0].state is State.CLOSED


@pytest_twisted.ensureDeferred
async def test_connection_closed_by_the_server_while_idle(env):
    fs, port = await env.sink(security="starttls")
    relay = env.relay(env.host(port, "starttls"))
    await relay.deliver(envelope(), MESSAGE)
    for protocol in list(fs._open):
        protocol.transport.loseConnection()
    await fs.wait_closed()
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert fs.connections == 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_before_the_server_times_out(env):
    fs, port = await env.sink(security="none")
    relay = env.relay(env.host(port), cfg=replace(FAST, connection_idle_timeout=0.3))
    await relay.deliver(envelope(), MESSAGE)
    assert fs.open_connections == 1
    await sleep(0.6)
    assert fs.open_connections == 0 and fs.commands[-1] == b"QUIT"


@pytest_twisted.ensureDeferred
async def test_name_mismatch_host_is_not_used_and_the_log_says_why(env, test_ca):
    wrong = test_ca.issue("wrong-name", "other.example.test")
    p, pport = await env.sink(security="smtps", cert=wrong)
    b, bport = await env.sink(security="smtps")
    relay = env.relay(env.host(pport, "smtps"), env.host(bport, "smtps"))
    with LogCapture() as logs:
        result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    assert p.messages == [] and p.commands == [] and len(b.messages) == 1
    text = logs.text()
    assert "TLS failure with localhost" in text and "MISCONFIGURED" in text
    assert relay.stats.misconfigured[f"127.0.0.1:{pport}"] == 1


@pytest_twisted.ensureDeferred
async def test_wildcard_certificate_is_accepted(env, test_ca):
    wildcard = test_ca.issue("wildcard", "*.itpison.test")
    fs, port = await env.sink(security="smtps", cert=wildcard)
    relay = env.relay(env.host(port, "smtps", tls_name="smtp.itpison.test"))
    result = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.DELIVERED}
    # ...but not for the bare domain or two labels deep (RFC 6125)
    for name in ("itpison.test", "a.smtp.itpison.test"):
        bad = env.relay(env.host(port, "smtps", tls_name=name))
        result = await bad.deliver(envelope(), MESSAGE)
        assert outcomes(result) == {"x@example.test": Outcome.TEMPFAIL}
        assert "TLS failure" in result.results[0].text
    assert fs.count == 1


@pytest_twisted.ensureDeferred
async def test_unreachable_port_falls_back_to_the_next_port(env):
    fs, port = await env.sink(security="starttls")
    closed = await env.closed_port()
    host = replace(env.host(closed, "smtps"),
                   fallbacks=(SmarthostFallback(port, "starttls"),))
    relay = env.relay(host)
    with LogCapture() as logs:
        first = await relay.deliver(envelope(), MESSAGE)
    assert outcomes(first) == {"x@example.test": Outcome.DELIVERED}
    assert first.host == f"127.0.0.1:{port}" and fs.messages[0].tls
    assert "trying its next port" in logs.text()
    relay.pool.close_idle()
    await relay.connector.wait_closed()
    with LogCapture() as logs:  # the working port is remembered: no second refused connect
        await relay.deliver(envelope(), MESSAGE)
    assert "trying its next port" not in logs.text() and fs.count == 2


@pytest_twisted.ensureDeferred
async def test_tls_failure_on_a_reachable_port_does_not_fall_back(env, test_ca):
    wrong = test_ca.issue("wrong-name-2", "other.example.test")
    p, pport = await env.sink(security="smtps", cert=wrong)
    fs, port = await env.sink(security="starttls")
    host = replace(env.host(pport, "smtps"), fallbacks=(SmarthostFallback(port, "starttls"),))
    result = await env.relay(host).deliver(envelope(), MESSAGE)
    assert outcomes(result) == {"x@example.test": Outcome.TEMPFAIL}
    assert fs.connections == 0  # a wrong certificate is not a blocked port
