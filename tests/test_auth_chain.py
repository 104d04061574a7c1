"""In memory: the checker chain's failure floor, the AUTH throttle per user name, the
positive cache, and the [auth.ldap] / listener auth configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from gateway.auth import AuthThrottle, BackendUnavailable, CheckerChain, Identity
from gateway.authcache import PositiveCache
from gateway.config import ConfigError, parse_config


class Fixed:
    """A checker answering after ``delay`` seconds of the clock."""

    def __init__(self, clock, outcome, delay=0.0):
        self.clock, self.outcome, self.delay = clock, outcome, delay

    def requestAvatarId(self, credentials):
        def answer():
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome
        return task.deferLater(self.clock, self.delay, answer)


def creds(user=b"u", password=b"p"):
    return UsernamePassword(user, password)


def fired_at(clock, d, step=0.01, limit=200):
    """Advance the clock in small steps; the time at which ``d`` fired."""
    result = []
    d.addBoth(result.append)
    for _ in range(limit):
        if result:
            break
        clock.advance(step)
    assert result, "never fired"
    if hasattr(result[0], "trap"):
        result[0].trap(UnauthorizedLogin, BackendUnavailable)
    return round(clock.seconds(), 2), result[0]


@pytest.mark.parametrize("outcome", [UnauthorizedLogin("no"), BackendUnavailable("down")])
def test_failures_are_padded_to_the_floor(outcome):
    clock = task.Clock()
    chain = CheckerChain([Fixed(clock, outcome, 0.02)], clock, floor=0.3)
    at, result = fired_at(clock, chain.requestAvatarId(creds()))
    assert at == 0.3 and result.check(type(outcome))


def test_unknown_user_and_slow_wrong_password_take_the_same_time():
    clock = task.Clock()
    fast = CheckerChain([Fixed(clock, UnauthorizedLogin("unknown"), 0.01)], clock, floor=0.3)
    slow = CheckerChain([Fixed(clock, UnauthorizedLogin("bad pw"), 0.2)], clock, floor=0.3)
    assert fired_at(clock, fast.requestAvatarId(creds()))[0] == 0.3
    start = clock.seconds()
    at, _ = fired_at(clock, slow.requestAvatarId(creds()))
    assert round(at - start, 2) == 0.3


def test_success_is_not_delayed_and_the_floor_follows_a_slow_backend():
    clock = task.Clock()
    ok = Identity("u", "test")
    chain = CheckerChain([Fixed(clock, ok, 0.05)], clock, floor=0.3)
    at, result = fired_at(clock, chain.requestAvatarId(creds()))
    assert at == 0.05 and result == ok
    slow = CheckerChain([Fixed(clock, UnauthorizedLogin("x"), 1.0)], clock, floor=0.3)
    for _ in range(30):
        fired_at(clock, slow.requestAvatarId(creds()), step=0.05)
    assert 1.3 < slow.minimum() < 1.5  # 1.5 x the typical (unpadded) failure time


def test_no_clock_means_no_padding():
    chain = CheckerChain([Fixed(task.Clock(), UnauthorizedLogin("x"))], None, floor=1.0)
    d = chain.requestAvatarId(creds())
    assert chain.floor == 0.0
    assert not d.called  # waits only for the checker's own clock


def test_throttle_counts_user_names_across_addresses():
    clock = task.Clock()
    throttle = AuthThrottle(3, 60, clock)
    counts = [defer.ensureDeferred(_value(throttle.record_failure(ip, "Dave")))
              for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
    assert [_now(d) for d in counts] == [1, 2, 3]
    assert _now(throttle.user_blocked("dave"))  # names compare case-insensitively
    assert not _now(throttle.user_blocked("alice"))
    assert not _now(throttle.blocked("10.0.0.1"))
    clock.advance(61)
    assert not _now(throttle.user_blocked("dave"))  # the failures aged out


def test_throttle_without_user_name_counts_the_address_only():
    throttle = AuthThrottle(2, 60, task.Clock())
    assert _now(throttle.record_failure("10.0.0.1")) == 1
    assert _now(throttle.record_failure("10.0.0.1", "")) == 2
    assert _now(throttle.blocked("10.0.0.1"))


async def _value(d):
    return await d


def _now(d):
    out = []
    d.addBoth(out.append)
    assert out, "not synchronous"
    return out[0]


def test_positive_cache_ttl_and_bound():
    clock = task.Clock()
    cache: PositiveCache[str] = PositiveCache(10, clock, max_entries=2)
    cache.put("a", "pw", "A")
    assert cache.get("a", "pw") == "A" and cache.get("a", "other") is None
    clock.advance(10)
    assert cache.get("a", "pw") is None and len(cache) == 0
    for user in ("a", "b", "c"):
        cache.put(user, "pw", user)
    assert len(cache) == 2 and cache.get("a", "pw") is None
    off: PositiveCache[str] = PositiveCache(0, clock)
    off.put("a", "pw", "A")
    assert off.get("a", "pw") is None and len(off) == 0


def _config(tmp_path: Path, auth=None, listener=None):
    data = {"smarthosts": [{"host": "a.example"}],
            "listeners": [{"endpoint": "tcp:0", "mode": "submission", **(listener or {})}]}
    if auth is not None:
        data["auth"] = auth
    return parse_config(data, base_dir=tmp_path)


@pytest.mark.parametrize("auth, listener, path", [
    ({}, {"auth": ["ldap"]}, "listeners[0].auth[0]"),
    ({"ldap": {"urls": ["ldaps://dc"], "bind_template": "{user}@x"}}, {"auth": ["ldap", "ldap"]},
     "listeners[0].auth[1]"),
    ({}, {"auth": ["kerberos"]}, "listeners[0].auth[0]"),
    ({"ldap": {"bind_template": "{user}@x"}}, None, "auth.ldap.urls"),
    ({"ldap": {"urls": ["ldap://dc"], "bind_template": "{user}@x"}}, None, "auth.ldap.starttls"),
    ({"ldap": {"urls": ["http://dc"], "bind_template": "{user}@x"}}, None, "auth.ldap.urls[0]"),
    ({"ldap": {"urls": ["ldaps://dc"]}}, None, "auth.ldap.bind_dn"),
    ({"ldap": {"urls": ["ldaps://dc"], "bind_dn": "cn=gw"}}, None, "auth.ldap.bind_password_file"),
    ({"ldap": {"urls": ["ldaps://dc"], "bind_template": "{usr}@x"}}, None,
     "auth.ldap.bind_template"),
    ({"ldap": {"urls": ["ldaps://dc"], "bind_template": "{user}", "bind_password": "x"}}, None,
     "auth.ldap.bind_password"),
    ({"omicard": {"senders": ["*@x.example"]}}, None, "auth.omicard.senders"),
    ({"omicard": {"cache": 1}}, None, "auth.omicard.cache"),
    ({"upstream_accounts": {"name": "x"}}, None, "auth.upstream_accounts"),
    ({"upstream_accounts": [{"name": "x", "groups": ["g"], "username": "u"}]}, None,
     "auth.upstream_accounts[0].password_file"),
    ({"upstream_accounts": [{"name": "x", "groups": [], "username": "u",
                             "password_file": "a.pass"}]}, None,
     "auth.upstream_accounts[0].groups"),
    ({"upstream_accounts": [{"name": "x", "groups": ["g"], "username": "u",
                             "password": "p"}]}, None, "auth.upstream_accounts[0].password"),
    ({"upstream_accounts": [{"name": n, "groups": ["g"], "username": "u",
                             "password_file": "a.pass"} for n in ("x", "x")]}, None,
     "auth.upstream_accounts[1].name"),
    ({"ldap": {"urls": ["ldaps://dc"], "bind_template": "{user}", "tls_verify": False,
               "ca_file": "ca.pem"}}, None, "auth.ldap.ca_file"),
])
def test_auth_config_errors_name_the_key(tmp_path, auth, listener, path):
    (tmp_path / "a.pass").write_text("x\n")
    (tmp_path / "ca.pem").write_text("not read before the check\n")
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, auth, listener)
    assert e.value.path == path


def test_omicard_refuses_plaintext_smarthosts(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config({"smarthosts": [{"host": "a.example", "security": "none"}],
                      "listeners": [{"endpoint": "tcp:0", "mode": "submission"}],
                      "auth": {"omicard": {}}}, base_dir=tmp_path)
    assert e.value.path == "auth.omicard"


def test_ldap_config_reads_the_service_password_from_a_file(tmp_path):
    (tmp_path / "ldap.pass").write_text("s3cret\n")
    config = _config(tmp_path, {"ldap": {"urls": ["ldaps://dc1", "ldaps://dc2"],
                                         "bind_dn": "cn=gw,dc=x", "base_dn": "dc=x",
                                         "bind_password_file": "ldap.pass", "cache_ttl": 0}})
    ldap = config.auth.ldap
    assert ldap.bind_password == "s3cret" and ldap.search and ldap.cache_ttl == 0
    assert "s3cret" not in repr(ldap)
