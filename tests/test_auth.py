"""auth.py: sender policy, principal, realm, checker chain, AUTH failure throttle."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from gateway.auth import (
    AuthThrottle,
    BackendUnavailable,
    CheckerChain,
    FrozenAttributes,
    Identity,
    IPrincipal,
    Principal,
    Realm,
    SenderPolicy,
    make_portal,
)

# --- sender policy -------------------------------------------------------------------

POLICY = ["alice@example.com", "@sales.example.com", "Bob@Example.ORG"]


@pytest.mark.parametrize("patterns, address, allowed", [
    (POLICY, "alice@example.com", True),
    (POLICY, "ALICE@EXAMPLE.COM", True),           # case-insensitive, local part too
    (POLICY, "alice2@example.com", False),
    (POLICY, "eve@example.com", False),
    (POLICY, "anyone@sales.example.com", True),
    (POLICY, "anyone@SALES.example.com", True),
    (POLICY, "x@eu.sales.example.com", False),      # subdomains are not the domain
    (POLICY, "x@example.sales.example.com.evil", False),
    (POLICY, "bob@example.org", True),
    (POLICY, "", False),                            # null sender needs "*"
    (POLICY, "sales.example.com", False),           # no @: never
    (POLICY, "@sales.example.com", False),
    (["*"], "anything@anywhere.test", True),
    (["*"], "", True),
    ([], "alice@example.com", False),
    ([], "", False),
])
def test_sender_policy(patterns: list[str], address: str, allowed: bool) -> None:
    assert SenderPolicy.parse(patterns).allows(address) is allowed
    principal = Principal("alice", "file", True, SenderPolicy.parse(patterns))
    assert principal.may_send_as(address) is allowed


@pytest.mark.parametrize("bad", [
    "alice", "alice@", "@", "@@example.com", "a@b@c", "*@example.com", "@*.example.com",
    "", "<alice@example.com>", "alice@example.com ", "@a,@b:alice@example.com",
    "ali\nce@example.com", "@exa mple.com", "**",
])
def test_sender_policy_rejects_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        SenderPolicy.parse(["alice@example.com", bad])
    assert repr(bad) in str(e.value)


def test_sender_policy_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        SenderPolicy.parse([42])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        SenderPolicy.parse("alice@example.com")


def test_sender_policy_normalises_and_dedupes() -> None:
    policy = SenderPolicy.parse(["Alice@Example.COM", "alice@example.com", "@EXAMPLE.org", "*"])
    assert policy.patterns == ("alice@example.com", "@example.org", "*")


# --- principal, identity, realm ---------------------------------------------------------

def test_principal_for_network() -> None:
    p = Principal.for_network("192.0.2.7")
    assert IPrincipal.providedBy(p)
    assert (p.name, p.backend, p.authenticated) == ("network:192.0.2.7", "network", False)
    assert p.may_send_as("anyone@anywhere.test") and p.may_send_as("")
    assert p.attributes == {}


def test_attributes_are_frozen_and_hashable() -> None:
    ident = Identity("alice", "ldap", ["alice@example.com"],  # type: ignore[arg-type]
                     {"options": {"x": [1, 2]}, "class": "bulk"})  # type: ignore[arg-type]
    assert ident.senders == ("alice@example.com",)
    assert ident.attributes["options"]["x"] == (1, 2)
    assert hash(ident) == hash(Identity("alice", "ldap", ("alice@example.com",),
                                        FrozenAttributes({"class": "bulk",
                                                          "options": {"x": (1, 2)}})))
    with pytest.raises(TypeError):
        ident.attributes["class"] = "other"  # type: ignore[index]
    p = Principal("a", "file", True, SenderPolicy(), {"k": ["v"]})
    assert isinstance(p.attributes, FrozenAttributes) and p.attributes["k"] == ("v",)
    hash(p)


def test_realm_builds_principal() -> None:
    ident = Identity("alice", "file", ("alice@example.com",), FrozenAttributes({"k": 1}))
    iface, principal, logout = Realm().requestAvatar(ident, None, IPrincipal)
    assert iface is IPrincipal
    assert principal == Principal("alice", "file", True,
                                  SenderPolicy(("alice@example.com",)), {"k": 1})
    logout()


def test_realm_refuses_other_interfaces_and_ids() -> None:
    from zope.interface import Interface

    class IOther(Interface):
        pass

    with pytest.raises(TypeError):
        Realm().requestAvatar(Identity("a", "file"), None, IOther)
    with pytest.raises(TypeError):
        Realm().requestAvatar(b"alice", None, IPrincipal)  # type: ignore[arg-type]


def test_realm_bad_policy_from_backend_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        Realm().requestAvatar(Identity("a", "ldap", ("not-an-address",)), None, IPrincipal)


# --- checker chain ----------------------------------------------------------------------

class FakeChecker:
    credentialInterfaces = (UsernamePassword,)

    def __init__(self, name: str, outcome: str, calls: list[str]) -> None:
        self.name, self.outcome, self.calls = name, outcome, calls

    def requestAvatarId(self, credentials: UsernamePassword) -> defer.Deferred[Identity]:
        self.calls.append(self.name)
        if self.outcome == "ok":
            return defer.succeed(Identity(f"{self.name}-user", self.name, ("*",)))
        if self.outcome == "no":
            return defer.fail(UnauthorizedLogin())
        if self.outcome == "down":
            return defer.fail(ConnectionRefusedError("directory down"))
        if self.outcome == "raise":  # a synchronous raise counts as unavailable too
            raise RuntimeError("bug")
        if self.outcome == "unavail":
            return defer.fail(BackendUnavailable("file unreadable"))
        raise AssertionError(self.outcome)


@pytest.mark.parametrize("outcomes, result, called", [
    (["ok"], "c0", ["c0"]),
    (["ok", "ok"], "c0", ["c0"]),
    (["no", "ok"], "c1", ["c0", "c1"]),
    (["down", "ok"], "c1", ["c0", "c1"]),
    (["raise", "no", "ok"], "c2", ["c0", "c1", "c2"]),
    (["ok", "down"], "c0", ["c0"]),
    (["no"], UnauthorizedLogin, ["c0"]),
    (["no", "no"], UnauthorizedLogin, ["c0", "c1"]),
    ([], UnauthorizedLogin, []),
    (["down"], BackendUnavailable, ["c0"]),
    (["unavail", "no"], BackendUnavailable, ["c0", "c1"]),
    (["no", "down"], BackendUnavailable, ["c0", "c1"]),
    (["no", "raise", "no"], BackendUnavailable, ["c0", "c1", "c2"]),
])
@pytest_twisted.ensureDeferred
async def test_checker_chain(outcomes: list[str], result: object, called: list[str]) -> None:
    calls: list[str] = []
    chain = CheckerChain([FakeChecker(f"c{i}", o, calls) for i, o in enumerate(outcomes)])
    creds = UsernamePassword(b"user", b"pw")
    if isinstance(result, str):
        ident = await chain.requestAvatarId(creds)
        assert ident.backend == result
    else:
        with pytest.raises(result):  # type: ignore[call-overload]
            await chain.requestAvatarId(creds)
    assert calls == called


@pytest_twisted.ensureDeferred
async def test_portal_login_through_chain() -> None:
    calls: list[str] = []
    portal = make_portal([FakeChecker("ldap", "down", calls), FakeChecker("file", "ok", calls)])
    iface, principal, logout = await portal.login(UsernamePassword(b"u", b"p"), None, IPrincipal)
    assert iface is IPrincipal
    assert principal.name == "file-user" and principal.authenticated
    logout()
    portal = make_portal([FakeChecker("file", "no", calls)])
    with pytest.raises(UnauthorizedLogin):
        await portal.login(UsernamePassword(b"u", b"p"), None, IPrincipal)


@pytest_twisted.ensureDeferred
async def test_chain_waits_for_slow_checkers() -> None:
    slow: defer.Deferred[Identity] = defer.Deferred()

    class Slow:
        def requestAvatarId(self, credentials: object) -> defer.Deferred[Identity]:
            return slow

    d = CheckerChain([Slow()]).requestAvatarId(UsernamePassword(b"u", b"p"))
    assert not d.called
    slow.callback(Identity("u", "slow"))
    assert (await d).account == "u"


# --- throttle ---------------------------------------------------------------------------

def now(d):
    """The result of a Deferred that the in-process store has already fired."""
    out = []
    d.addBoth(out.append)
    assert out, "the in-process store answers at once"
    return out[0]


def test_throttle_blocks_after_max_failures_within_window() -> None:
    clock = task.Clock()
    t = AuthThrottle(max_failures=3, window=60, clock=clock)
    assert not now(t.blocked("192.0.2.1"))
    assert now(t.record_failure("192.0.2.1")) == 1
    clock.advance(10)
    assert now(t.record_failure("192.0.2.1")) == 2
    assert not now(t.blocked("192.0.2.1"))
    clock.advance(10)
    assert now(t.record_failure("192.0.2.1")) == 3
    assert now(t.blocked("192.0.2.1"))
    assert not now(t.blocked("192.0.2.2"))          # per IP
    clock.advance(40)                           # the first failure leaves the window
    assert not now(t.blocked("192.0.2.1"))
    assert now(t.record_failure("192.0.2.1")) == 3
    assert now(t.blocked("192.0.2.1"))


def test_throttle_success_does_not_reset() -> None:
    clock = task.Clock()
    t = AuthThrottle(max_failures=2, window=60, clock=clock)
    now(t.record_failure("192.0.2.1"))
    now(t.record_success("192.0.2.1"))
    assert now(t.record_failure("192.0.2.1")) == 2
    now(t.record_success("192.0.2.1"))
    assert now(t.blocked("192.0.2.1"))


def test_throttle_count_saturates_and_expires() -> None:
    clock = task.Clock()
    t = AuthThrottle(max_failures=3, window=60, clock=clock)
    for _ in range(10):
        n = now(t.record_failure("192.0.2.1"))
    assert n == 3 and now(t.blocked("192.0.2.1"))
    now(t.record_failure("192.0.2.2"))
    clock.advance(61)
    now(t.record_failure("192.0.2.3"))               # any failure sweeps stale entries
    assert t.store.failure_entries() == 1
    assert not now(t.blocked("192.0.2.1"))


def test_throttle_table_is_capped_oldest_first() -> None:
    clock = task.Clock()
    t = AuthThrottle(max_failures=1, window=600, clock=clock, max_entries=3)
    for i in range(5):
        now(t.record_failure(f"192.0.2.{i}"))
        clock.advance(1)
    assert t.store.failure_entries() == 3
    assert [now(t.blocked(f"192.0.2.{i}")) for i in range(5)] == [False, False, True, True, True]
    now(t.record_failure("192.0.2.2"))               # refreshed: now the newest
    now(t.record_failure("192.0.2.9"))
    assert [now(t.blocked(f"192.0.2.{i}")) for i in (2, 3, 4, 9)] == [True, False, True, True]


@pytest.mark.parametrize("args", [(0, 60), (3, 0), (3, -1)])
def test_throttle_rejects_bad_settings(args: tuple[int, float]) -> None:
    with pytest.raises(ValueError):
        AuthThrottle(*args, clock=task.Clock())
