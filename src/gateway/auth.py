"""Authentication: the cred realm, the principal (avatar), the checker chain, the AUTH throttle.

The listener asks ``make_portal(checkers)`` for an ``IPrincipal``::

    portal.login(credentials, None, IPrincipal) -> (IPrincipal, Principal, logout)

and maps the outcome to a reply: a ``Principal`` means 235; ``UnauthorizedLogin`` means
535 5.7.8; anything else (``BackendUnavailable`` above all) means 454 4.7.0.  A client on a
trusted network that does not AUTH gets ``Principal.for_network(ip)`` instead.

Checkers return an ``Identity`` (a hashable value) as the avatar id; the realm turns it into
a ``Principal``, the per-login policy object the later stages consult.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from gateway.envelope import parse_address
from gateway.ratelimit_local import LocalStore
from gateway.reply import ReplyError

log = Logger(namespace="gateway.auth")

UnauthorizedLogin = cred_error.UnauthorizedLogin


class BackendUnavailable(Exception):
    """A checker could not decide (directory down, users file unreadable): 454 4.7.0."""


def valid_login(user: str) -> bool:
    """False for names that can never be a login, before any backend is asked: empty,
    over 256 characters, control characters (NUL above all)."""
    return 0 < len(user) <= 256 and not any(ord(ch) < 32 or ord(ch) == 127 for ch in user)


class FrozenAttributes(Mapping[str, Any]):
    """An immutable, hashable mapping; lists become tuples, dicts become FrozenAttributes."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        items = data.items() if isinstance(data, Mapping) else data
        self._data = {str(k): _freeze(v) for k, v in items}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenAttributes({self._data!r})"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenAttributes(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(_freeze(v) for v in value)
    return value


EMPTY_ATTRIBUTES = FrozenAttributes()


@dataclass(frozen=True)
class SenderPolicy:
    """The envelope senders a principal may use.

    Patterns: an exact address (``alice@example.com``), a whole domain (``@example.com``:
    exactly that domain, not its subdomains) or ``*`` (any sender, the null sender ``<>``
    included).  Matching ignores case in both the local part and the domain.
    """

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> SenderPolicy:
        """Validate and normalise patterns; raises ValueError naming the bad one."""
        if isinstance(patterns, str):
            raise ValueError(f"sender patterns must be a list, not the string {patterns!r}")
        out: list[str] = []
        for pattern in patterns:
            normal = _normalise_pattern(pattern)
            if normal not in out:
                out.append(normal)
        return cls(tuple(out))

    def allows(self, address: str) -> bool:
        if "*" in self.patterns:
            return True
        if not address:
            return False
        address = address.lower()
        at = address.rfind("@")
        if at <= 0:
            return False
        return address in self.patterns or address[at:] in self.patterns


def _normalise_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError(f"bad sender pattern {pattern!r}: not a string")
    if pattern == "*":
        return pattern
    if pattern.startswith("*@"):  # a valid mailbox, but surely meant as a wildcard
        raise ValueError(f"bad sender pattern {pattern!r}: write a whole domain as "
                         f"{pattern[1:]!r}")
    domain_only = pattern.startswith("@")
    try:
        address = parse_address(("postmaster" if domain_only else "") + pattern, is_sender=True)
    except ReplyError:
        address = None
    normal = None
    if address is not None and not address.is_null:
        normal = "@" + address.domain if domain_only else str(address).lower()
    # The canonical form must be the pattern itself: no source route, no stray text.
    if normal is None or normal != pattern.lower():
        raise ValueError(
            f"bad sender pattern {pattern!r}: expected user@domain, @domain or *")
    return normal


class IPrincipal(Interface):
    """Who is on the other end of a session, and what they may do."""

    name = Attribute("The account name, or 'network:<ip>' for a trusted-network client")
    backend = Attribute("Where the identity came from: 'file', 'network', 'ldap', 'omicard'")
    authenticated = Attribute("True after a successful AUTH")

    def may_send_as(address: str) -> bool:  # type: ignore[misc]
        """May this principal use ``address`` ("" for ``<>``) as the envelope sender?"""


@implementer(IPrincipal)
@dataclass(frozen=True)
class Principal:
    """The avatar: the per-login policy object.

    ``attributes`` is a frozen mapping for what later stages need beyond the senders: the
    X-Header option defaults, the rate-limit class, the upstream identity to present to the
    smarthost.  Backends fill it through ``Identity.attributes``.
    """

    name: str
    backend: str
    authenticated: bool
    senders: SenderPolicy
    attributes: Mapping[str, Any] = field(default=EMPTY_ATTRIBUTES)

    def __post_init__(self) -> None:
        if not isinstance(self.attributes, FrozenAttributes):
            object.__setattr__(self, "attributes", FrozenAttributes(self.attributes))

    def may_send_as(self, address: str) -> bool:
        return self.senders.allows(address)

    @classmethod
    def for_network(cls, ip: str) -> Principal:
        """A client trusted by its address: not authenticated, may use any sender."""
        return cls(name=f"network:{ip}", backend="network", authenticated=False,
                   senders=SenderPolicy(("*",)))


@dataclass(frozen=True)
class Identity:
    """What a checker returns as the avatar id: hashable, so cred can pass it around."""

    account: str
    backend: str
    senders: tuple[str, ...] = ()
    attributes: FrozenAttributes = field(default=EMPTY_ATTRIBUTES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "senders", tuple(self.senders))
        if not isinstance(self.attributes, FrozenAttributes):
            object.__setattr__(self, "attributes", FrozenAttributes(self.attributes))


def _logout() -> None:
    """Nothing to release per login (yet)."""


@implementer(IRealm)
class Realm:
    """Turns an ``Identity`` into an authenticated ``Principal``."""

    def requestAvatar(self, avatarId: Identity, mind: object,
                      *interfaces: Any) -> tuple[Any, Principal, Callable[[], None]]:
        if IPrincipal not in interfaces:
            raise TypeError(f"this realm only provides IPrincipal, not {interfaces!r}")
        if not isinstance(avatarId, Identity):
            raise TypeError(f"avatar id must be an Identity, not {type(avatarId).__name__}")
        try:
            senders = SenderPolicy.parse(avatarId.senders)
        except ValueError as e:
            # A backend handing out a broken policy is a backend fault, not a bad password.
            log.error("backend {backend} returned a bad sender policy for {account}: {error}",
                      backend=avatarId.backend, account=avatarId.account, error=str(e))
            raise BackendUnavailable(f"bad sender policy from {avatarId.backend}") from e
        principal = Principal(name=avatarId.account, backend=avatarId.backend,
                              authenticated=True, senders=senders,
                              attributes=avatarId.attributes)
        return IPrincipal, principal, _logout


@implementer(ICredentialsChecker)
class CheckerChain:
    """Try each checker in order; the first success wins.

    ``UnauthorizedLogin`` from a checker (unknown user, bad password) moves on to the next.
    Any other error marks the backend unavailable, is logged, and also moves on.  When no
    checker succeeds: ``BackendUnavailable`` if any backend was unavailable (the user may
    exist there), else ``UnauthorizedLogin``.

    Timing: a failure is answered no sooner than ``floor`` seconds after the attempt
    started, or than 1.5 times the recent typical failure time if that is longer (an
    exponential average of the unpadded times, so a slow directory raises the floor by
    itself).  An unknown user, a wrong password, a user outside the required groups and an
    unreachable backend thus all take about the same time, and the answer says nothing
    about which backend, or which step, refused.  Successes are not delayed: the client
    learns it succeeded anyway.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers: Sequence[ICredentialsChecker], clock: IReactorTime | None = None,
                 floor: float = 0.0) -> None:
        self.checkers = tuple(checkers)
        self.clock = clock
        self.floor = floor if clock is not None else 0.0
        self.typical_failure = 0.0  # exponential average of unpadded failure times

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Identity]:
        return defer.ensureDeferred(self._check(credentials))

    async def _check(self, credentials: Any) -> Identity:
        started = self.clock.seconds() if self.clock is not None else 0.0
        try:
            return await self._first_success(credentials)
        except Exception:
            await self._pad(started)
            raise

    async def _first_success(self, credentials: Any) -> Identity:
        unavailable: list[str] = []
        for checker in self.checkers:
            try:
                return await defer.maybeDeferred(checker.requestAvatarId, credentials)
            except cred_error.UnauthorizedLogin:
                continue
            except Exception as e:
                name = type(checker).__name__
                unavailable.append(name)
                log.warn("auth backend {checker} unavailable: {error}", checker=name,
                         error=f"{type(e).__name__}: {e}")
        if unavailable:
            raise BackendUnavailable("unavailable: " + ", ".join(unavailable))
        raise cred_error.UnauthorizedLogin("no backend accepted the credentials")

    def minimum(self) -> float:
        """How long a failure takes at least, now."""
        return max(self.floor, 1.5 * self.typical_failure) if self.floor > 0 else 0.0

    async def _pad(self, started: float) -> None:
        if self.clock is None or self.floor <= 0:
            return
        elapsed = self.clock.seconds() - started
        wait = self.minimum() - elapsed
        self.typical_failure += 0.1 * (elapsed - self.typical_failure)
        if wait > 0:
            await task.deferLater(self.clock, wait)


def make_portal(checkers: Sequence[ICredentialsChecker], clock: IReactorTime | None = None,
                floor: float = 0.0) -> Portal:
    """A portal over ``Realm`` with all checkers behind one ``CheckerChain``."""
    return Portal(Realm(), [CheckerChain(checkers, clock, floor)])


class AuthThrottle:
    """Failed AUTH attempts per client IP and per user name, in a sliding window, on a
    rate-limit store.

    ``blocked(ip)`` is true while ``max_failures`` failures from that address lie within
    the last ``window`` seconds; ``user_blocked(name)`` the same for failures on that user
    name from any address (a password guessed from many addresses).  Both end the session
    with 421 4.7.0.  A success does not clear the counts: one good login must not buy an
    attacker another round of guesses (on another account, from the same address).  The
    failures simply age out.  The price of the per-name count: an attacker can keep a
    known user name locked for as long as they keep failing on it.

    The store is the rate limiter's (``ratelimit_local.LocalStore`` in this process, or
    ``ratelimit_redis.RedisStore`` shared by every node), so the answers are Deferreds;
    with the store's ``fail_closed`` they may fail with ``LimiterUnavailable``.  Each key
    keeps at most ``max_failures`` timestamps (``record_failure`` saturates there).
    User names are stored as a hash (bounded keys, no names in Redis).
    """

    def __init__(self, max_failures: int, window: float, clock: IReactorTime | None = None,
                 max_entries: int = 100_000, store: Any = None) -> None:
        if max_failures < 1 or window <= 0 or max_entries < 1:
            raise ValueError("max_failures and max_entries must be >= 1, window > 0")
        if store is None:
            if clock is None:
                raise ValueError("an AuthThrottle needs a clock or a store")
            store = LocalStore(clock, max_entries)
        self.max_failures = max_failures
        self.window = window
        self.store = store

    @staticmethod
    def _user_key(username: str) -> str:
        digest = hashlib.sha256(username.casefold().encode("utf-8", "surrogatepass"))
        return f"authfail-user:{digest.hexdigest()[:32]}"

    def record_failure(self, ip: str, username: str | None = None) -> defer.Deferred[int]:
        """Count a failed AUTH for the address (and the user name); fires with the larger
        number of failures within the window (capped at ``max_failures``)."""
        calls = [self.store.add_failure(f"authfail:{ip}", self.window, self.max_failures)]
        if username:
            calls.append(self.store.add_failure(self._user_key(username), self.window,
                                                self.max_failures))
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)  # the first error, unwrapped
        return d.addCallback(max)

    def record_success(self, ip: str) -> defer.Deferred[None]:
        """A successful AUTH changes nothing (see the class docstring)."""
        return defer.succeed(None)

    def blocked(self, ip: str) -> defer.Deferred[bool]:
        d = self.store.count_failures(f"authfail:{ip}", self.window)
        return d.addCallback(lambda count: count >= self.max_failures)

    def user_blocked(self, username: str) -> defer.Deferred[bool]:
        d = self.store.count_failures(self._user_key(username), self.window)
        return d.addCallback(lambda count: count >= self.max_failures)


def credential_text(value: str | bytes) -> str | None:
    """A username or password from twisted.cred credentials as text (None if not UTF-8)."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None
