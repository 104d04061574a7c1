"""The LDAP checker against a real slapd (tests/slapdrig.py): search then bind and direct
bind, StartTLS and LDAPS verified with the test CA, failover, group gate, attribute
mapping, injection attempts, the cache, and the directory going away and coming back."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor, task

from gateway.auth import BackendUnavailable, Identity
from gateway.auth_ldap import LdapChecker, option_defaults
from gateway.config_auth import LdapSection
from pki import TestCA
from procrig import free_port
from slapdrig import SERVICE_DN, SERVICE_PASSWORD, SUFFIX, Slapd

PEOPLE = f"ou=people,{SUFFIX}"


def search_section(slapd: Slapd, **changes) -> LdapSection:
    base = LdapSection(urls=(slapd.url,), starttls=True, ca_file=slapd.ca_pem,
                       bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD, base_dn=SUFFIX,
                       required_groups=("relay",), class_attribute="mailRateClass",
                       options_attribute="mailOptionDefault", cache_ttl=0,
                       breaker_failures=2, breaker_cooldown=0.5)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def make_checker():
    started: list[LdapChecker] = []

    def make(section: LdapSection) -> LdapChecker:
        checker = LdapChecker(section, reactor)
        checker.startService()
        started.append(checker)
        return checker

    yield make
    for checker in started:
        pytest_twisted.blockon(checker.stopService())


async def login(checker, user, password):
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return await checker.requestAvatarId(UsernamePassword(u, p))


async def outcome(checker, user, password) -> str:
    try:
        identity = await login(checker, user, password)
    except UnauthorizedLogin:
        return "535"
    except BackendUnavailable:
        return "454"
    assert isinstance(identity, Identity)
    return "235"


@pytest_twisted.ensureDeferred
async def test_search_then_bind_over_starttls_maps_attributes(slapd, make_checker):
    checker = make_checker(search_section(slapd))
    identity = await login(checker, "alice", "alice-pw")
    assert identity.account == "alice" and identity.backend == "ldap"
    # mail plus the smtp: proxyAddresses; X500: and sip: ones are not addresses
    assert identity.senders == ("alice@example.test", "a.smith@example.test")
    assert identity.attributes["groups"] == ("relay",)
    assert identity.attributes["class"] == "bulk"
    assert dict(identity.attributes["option_defaults"]) == {"job_option": "CreateReport"}
    assert identity.attributes["dn"] == f"uid=alice,{PEOPLE}"
    # the login may also be the mail address (the default filter looks at uid and mail)
    assert (await login(checker, "dave@example.test", "dave-pw")).attributes["dn"] == \
        f"uid=dave,{PEOPLE}"


@pytest_twisted.ensureDeferred
async def test_ldaps_with_verified_certificate(slapd, make_checker):
    checker = make_checker(search_section(slapd, urls=(slapd.ldaps_url,), starttls=False))
    assert await outcome(checker, "alice", "alice-pw") == "235"
    assert await outcome(checker, "alice", "wrong") == "535"


@pytest_twisted.ensureDeferred
async def test_wrong_password_unknown_user_group_gate_and_ambiguity(slapd, make_checker):
    checker = make_checker(search_section(slapd))
    assert await outcome(checker, "alice", "not-alice") == "535"
    assert await outcome(checker, "nobody", "alice-pw") == "535"
    assert await outcome(checker, "bob", "bob-pw") == "535"  # right password, not in "relay"
    assert await outcome(checker, "twin@example.test", "twin-pw") == "535"  # two entries
    assert await outcome(checker, "twin1", "twin-pw") == "235"
    # without the gate, bob may relay
    open_checker = make_checker(search_section(slapd, required_groups=()))
    assert await outcome(open_checker, "bob", "bob-pw") == "235"


@pytest_twisted.ensureDeferred
async def test_group_gate_by_group_search(slapd, make_checker):
    checker = make_checker(search_section(slapd, group_base=f"ou=groups,{SUFFIX}",
                                          required_groups=(f"cn=staff,ou=groups,{SUFFIX}",)))
    bob = await login(checker, "bob", "bob-pw")
    assert bob.attributes["groups"] == ("staff",)
    assert await outcome(checker, "alice", "alice-pw") == "535"


INJECTIONS = ["*", ")(uid=*", "alice)(uid=*", "*)(|(uid=*", "al*", "alice*", "(uid=alice)",
              "alice\0", "alice\0junk", "\0", "alice)(|(objectClass=*", "*)(objectClass=*",
              "alice,ou=people", f"uid=alice,{PEOPLE}", "alice\\", "a" * 300]


@pytest.mark.parametrize("mode", ["search", "direct"])
@pytest_twisted.ensureDeferred
async def test_injection_attempts_never_authenticate(slapd, make_checker, mode):
    section = search_section(slapd) if mode == "search" else LdapSection(
        urls=(slapd.ldaps_url,), ca_file=slapd.ca_pem, bind_template=f"uid={{user}},{PEOPLE}",
        cache_ttl=0)
    checker = make_checker(section)
    for user in INJECTIONS:
        for password in ("alice-pw", "*", "star-pw"):
            assert await outcome(checker, user, password) == "535", (user, password)
    assert await outcome(checker, "alice", "") == "535"  # never an unauthenticated bind
    assert await outcome(checker, "alice", "alice-pw\0") == "535"
    assert await outcome(checker, "alice", "alice-pw") == "235"  # the same checker works


@pytest_twisted.ensureDeferred
async def test_direct_bind_with_dn_template_reads_own_entry(slapd, make_checker):
    checker = make_checker(LdapSection(urls=(slapd.ldaps_url,), ca_file=slapd.ca_pem,
                                       bind_template=f"uid={{user}},{PEOPLE}",
                                       required_groups=("relay",), cache_ttl=0))
    alice = await login(checker, "alice", "alice-pw")
    assert alice.senders == ("alice@example.test", "a.smith@example.test")
    assert await outcome(checker, "bob", "bob-pw") == "535"  # memberOf: staff only
    assert await outcome(checker, "alice", "bob-pw") == "535"


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_refused_unless_told(slapd, make_checker, tmp_path):
    other = TestCA(tmp_path / "other", name="some other CA")
    strict = make_checker(search_section(slapd, urls=(slapd.ldaps_url,), starttls=False,
                                         ca_file=other.ca_pem, breaker_failures=100))
    assert await outcome(strict, "alice", "alice-pw") == "454"
    starttls = make_checker(search_section(slapd, ca_file=other.ca_pem, breaker_failures=100))
    assert await outcome(starttls, "alice", "alice-pw") == "454"
    # a name the certificate does not carry
    misnamed = make_checker(search_section(slapd, tls_name="ldap.elsewhere.test",
                                           breaker_failures=100))
    assert await outcome(misnamed, "alice", "alice-pw") == "454"
    named = make_checker(search_section(slapd, tls_name="localhost"))
    assert await outcome(named, "alice", "alice-pw") == "235"
    lax = make_checker(search_section(slapd, urls=(slapd.ldaps_url,), starttls=False,
                                      ca_file=None, tls_verify=False))
    assert await outcome(lax, "alice", "alice-pw") == "235"


@pytest_twisted.ensureDeferred
async def test_failover_to_the_next_url(slapd, make_checker):
    dead = f"ldaps://127.0.0.1:{free_port()}"
    checker = make_checker(search_section(slapd, urls=(dead, slapd.ldaps_url), starttls=False))
    assert await outcome(checker, "alice", "alice-pw") == "235"
    assert await outcome(checker, "alice", "wrong") == "535"


@pytest_twisted.ensureDeferred
async def test_directory_down_gives_454_breaker_then_recovery(running_slapd, make_checker):
    slapd = running_slapd
    checker = make_checker(search_section(slapd, cache_ttl=60))
    assert await outcome(checker, "alice", "alice-pw") == "235"  # now cached
    slapd.stop()
    assert await outcome(checker, "dave", "dave-pw") == "454"
    assert await outcome(checker, "dave", "dave-pw") == "454"  # second failure: breaker opens
    assert checker._open_until is not None
    d = checker.requestAvatarId(UsernamePassword(b"dave", b"dave-pw"))
    assert d.called  # answered at once, no thread involved
    with pytest.raises(BackendUnavailable):
        await d
    assert await outcome(checker, "alice", "alice-pw") == "235"  # the cache rides it out
    assert await outcome(checker, "alice", "wrong") == "454"  # never a 535 without asking
    slapd.start()
    await task.deferLater(reactor, 0.6, lambda: None)  # past breaker_cooldown
    assert await outcome(checker, "dave", "dave-pw") == "235"  # the probe closes the breaker
    assert checker._open_until is None
    assert await outcome(checker, "bob", "wrong") == "535"


@pytest_twisted.ensureDeferred
async def test_frozen_directory_times_out_with_454(running_slapd, make_checker):
    slapd = running_slapd
    checker = make_checker(search_section(slapd, receive_timeout=1, connect_timeout=1,
                                          breaker_failures=100))
    assert await outcome(checker, "alice", "alice-pw") == "235"  # a pooled service connection
    slapd.freeze()
    assert await outcome(checker, "dave", "dave-pw") == "454"
    slapd.thaw()
    assert await outcome(checker, "dave", "dave-pw") == "235"


@pytest_twisted.ensureDeferred
async def test_cache_keys_are_hmacs_and_ttl_zero_is_off(slapd, make_checker):
    checker = make_checker(search_section(slapd, cache_ttl=30))
    assert await outcome(checker, "alice", "alice-pw") == "235"
    assert await outcome(checker, "alice", "alice-pw") == "235"
    assert checker.cache.hits == 1 and len(checker.cache) == 1
    assert await outcome(checker, "alice", "wrong") == "535"  # failures are never cached
    assert len(checker.cache) == 1
    (key,) = checker.cache._entries
    assert len(key) == 32 and b"alice-pw" not in key and b"alice" not in key
    off = make_checker(search_section(slapd, cache_ttl=0))
    for _ in range(2):
        assert await outcome(off, "alice", "alice-pw") == "235"
    assert len(off.cache) == 0 and off.cache.hits == 0


def test_option_defaults_parsing():
    assert option_defaults(["job_option=CreateReport,SendReport", "X-LinkOption=0",
                            "nonsense", "X-Unknown=1", "job_name = Weekly, report"]) == {
        "job_option": ("CreateReport", "SendReport"), "link_option": 0,
        "job_name": "Weekly, report"}
