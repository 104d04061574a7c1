"""AUTH through the whole gateway over real sockets: smtplib → submission (STARTTLS, AUTH)
→ LDAP (a real slapd) and the users file → spool → relay → smarthost sink."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from gatewayrig import smarthost_entry, start_gateway
from slapdrig import SERVICE_DN, SERVICE_PASSWORD, SUFFIX

CAROL = ("carol-local-pw", ["carol@example.com"])


def ldap_section(slapd, tmp_path, **extra):
    secret = tmp_path / "ldap.pass"
    secret.write_text(SERVICE_PASSWORD + "\n")
    return {"urls": [slapd.url], "starttls": True, "ca_file": str(slapd.ca_pem),
            "bind_dn": SERVICE_DN, "bind_password_file": str(secret), "base_dn": SUFFIX,
            "required_groups": ["relay"], "class_attribute": "mailRateClass",
            "cache_ttl": 0, "breaker_failures": 1, "breaker_cooldown": 0.3, **extra}


@pytest_twisted.async_yield_fixture()
async def gateway(tmp_path, test_ca, server_cert, smarthost, relay_password, slapd):
    gw = await start_gateway(
        tmp_path, test_ca, server_cert,
        [smarthost_entry(smarthost.port, test_ca.ca_pem, password_file=relay_password)],
        users={"carol": CAROL},
        listeners=[{"mode": "submission"}, {"mode": "submission", "name": "files-only",
                                            "auth": ["file"]}],
        auth={"ldap": ldap_section(slapd, tmp_path), "max_failures": 3,
              "failure_floor": 0.05})
    yield gw
    await gw.stop()


def message(sender: str) -> bytes:
    return f"From: {sender}\r\nTo: bob@example.net\r\nSubject: t\r\n\r\nhello\r\n".encode()


def session(gw, listener: str, user: str, password: str, sender: str | None = None,
            source: str | None = None):
    """AUTH after STARTTLS; the AUTH reply code, and the sendmail refusals when sending."""
    with gw.smtp(listener, source=source) as c:
        c.starttls(context=gw.tls_context())
        c.ehlo("client.example")
        c.user, c.password = user, password
        try:  # one mechanism only: smtplib's login() would try PLAIN, then LOGIN
            code, _ = c.auth("PLAIN", c.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, None
        except smtplib.SMTPServerDisconnected:
            return 421, None
        if sender is None:
            return code, None
        return code, c.sendmail(sender, ["bob@example.net"], message(sender))


def run(*args, **kwargs):
    return threads.deferToThread(session, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_ldap_user_relays_with_directory_senders_under_the_upstream_account(
        gateway, smarthost):
    assert await run(gateway, "submission", "alice", "alice-pw", "a.smith@example.test") == \
        (235, {})
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await run(gateway, "submission", "alice", "alice-pw", "mallory@example.test")
    assert refused.value.smtp_code == 553
    assert await run(gateway, "submission", "bob", "bob-pw") == (535, None)  # group gate
    assert await run(gateway, "submission", "alice", "wrong") == (535, None)
    await smarthost.wait_for_messages(1, timeout=20)
    got = smarthost.messages[0]
    assert got.mail_from == "a.smith@example.test"
    assert got.auth_user == "relay-account"  # LDAP users relay under the configured account


@pytest_twisted.ensureDeferred
async def test_checker_chain_per_listener(gateway):
    assert (await run(gateway, "submission", "carol", CAROL[0]))[0] == 235  # ldap, then file
    assert (await run(gateway, "files-only", "carol", CAROL[0]))[0] == 235
    assert (await run(gateway, "files-only", "alice", "alice-pw"))[0] == 535  # no LDAP here


@pytest_twisted.ensureDeferred
async def test_directory_stopped_454_then_recovery(gateway, running_slapd):
    running_slapd.stop()
    assert (await run(gateway, "submission", "alice", "alice-pw"))[0] == 454
    # the users file still answers for its own users; a wrong password stays 454, since
    # the directory might have known the user
    assert (await run(gateway, "submission", "carol", CAROL[0]))[0] == 235
    running_slapd.start()
    await task.deferLater(reactor, 0.4, lambda: None)  # past breaker_cooldown
    assert (await run(gateway, "submission", "alice", "alice-pw"))[0] == 235


@pytest_twisted.ensureDeferred
async def test_failures_per_user_name_lock_it_from_any_address(gateway):
    # one failure each from three addresses: no address reaches max_failures = 3 ...
    for source in ("127.0.0.2", "127.0.0.3"):
        assert (await run(gateway, "submission", "dave", "guess", source=source))[0] == 535
    # ... but the user name does: the failure that reaches the limit ends the session,
    assert (await run(gateway, "submission", "dave", "guess", source="127.0.0.4"))[0] == 421
    # and then even the right password is refused, from anywhere
    assert (await run(gateway, "submission", "dave", "dave-pw", source="127.0.0.5"))[0] == 421
    # that address is not blocked for other users
    assert (await run(gateway, "submission", "alice", "alice-pw", source="127.0.0.5"))[0] == 235


@pytest_twisted.ensureDeferred
async def test_failures_per_address(gateway):
    for user in ("u1", "u2"):
        assert (await run(gateway, "submission", user, "x", source="127.0.0.9"))[0] == 535
    assert (await run(gateway, "submission", "u3", "x", source="127.0.0.9"))[0] == 421
    # the 421 really ends the session: its connection slot is free again (the session
    # was paused waiting for the answer; a close must not wait for input forever)
    for _ in range(100):
        if "127.0.0.9" not in gateway.service.connections.per_ip:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert "127.0.0.9" not in gateway.service.connections.per_ip
    assert (await run(gateway, "submission", "alice", "alice-pw", source="127.0.0.9"))[0] == 421
    assert (await run(gateway, "submission", "alice", "alice-pw", source="127.0.0.10"))[0] == 235


@pytest_twisted.ensureDeferred
async def test_reload_rebuilds_the_ldap_checker(gateway):
    """A reload with new [auth.ldap] settings swaps the checker (and its thread pool)."""
    from dataclasses import replace

    service = gateway.service
    assert await run(gateway, "submission", "bob", "bob-pw") == (535, None)  # group gate
    old = service.auth.checkers["ldap"]
    config = service.config
    opened = replace(config, auth=replace(config.auth,
                                          ldap=replace(config.auth.ldap, required_groups=())))
    service.reloader.load = lambda current: opened
    assert service.reload() is True
    assert service.auth.checkers["ldap"] is not old
    assert not old.running and service.auth.checkers["ldap"].running
    assert await run(gateway, "submission", "bob", "bob-pw") == (235, None)
    # The listener limited to the users file still has no LDAP backend after the reload.
    assert await run(gateway, "files-only", "bob", "bob-pw") == (535, None)
