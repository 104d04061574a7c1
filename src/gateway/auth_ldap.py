"""The LDAP / Active Directory checker (``[auth.ldap]``).

``LdapChecker`` is a cred checker and a service: it owns a bounded thread pool where the
blocking ldap3 calls run (``gateway.ldapdir``), never on the reactor thread, behind a
``DeferredSemaphore`` so the pool's unbounded queue never grows (twisted-notes §6).

On the reactor side it adds:

- a positive-result cache (``authcache``), consulted first, so a known good login is
  answered at once and even while the directory is down, for ``cache_ttl``;
- a breaker: after ``breaker_failures`` directory errors in a row, checks fail at once
  with ``BackendUnavailable`` (454) for ``breaker_cooldown`` seconds; then one check
  probes the directory, and its outcome closes or reopens the breaker;
- the mapping from directory attributes to the ``Identity``: senders (``mail``, AD
  ``proxyAddresses`` with their ``smtp:`` prefixes), ``groups`` (group names),
  ``class`` (rate-limit class), ``option_defaults`` (X-Header defaults, ``Header=value``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway import xheaders as X
from gateway.auth import (
    BackendUnavailable,
    Identity,
    SenderPolicy,
    credential_text,
    valid_login,
)
from gateway.authcache import PositiveCache
from gateway.config_auth import LdapSection
from gateway.ldapdir import (
    BadCredentials,
    Directory,
    DirectoryError,
    DirectoryUser,
    group_name,
)

log = Logger(namespace="gateway.auth.ldap")


@implementer(ICredentialsChecker)
class LdapChecker(service.Service):
    credentialInterfaces = (IUsernamePassword,)
    name = "ldap"

    def __init__(self, section: LdapSection, reactor: Any,
                 directory: Directory | None = None) -> None:
        self.section = section
        self.reactor = reactor
        self.directory = directory or Directory(section)
        self.cache: PositiveCache[Identity] = PositiveCache(section.cache_ttl, reactor)
        self.pool = ThreadPool(minthreads=1, maxthreads=section.pool_size, name="ldap")
        self.semaphore = defer.DeferredSemaphore(section.pool_size)
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    # -- lifecycle ------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = threads.deferToThreadPool(self.reactor, self.pool, self.directory.close)
        d.addErrback(lambda f: log.warn("closing LDAP connections: {e}", e=f.getErrorMessage()))
        d.addBoth(lambda _: self.pool.stop())
        return d

    # -- the check ------------------------------------------------------------------------
    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Identity]:
        user, password = credential_text(credentials.username), credential_text(credentials.password)
        if user is None or password is None or not valid_login(user) or not password:
            return defer.fail(UnauthorizedLogin("not a valid login"))
        cached = self.cache.get(user, password)
        if cached is not None:
            return defer.succeed(cached)
        if not self._admit():
            return defer.fail(BackendUnavailable("directory marked down (breaker open)"))
        d = self.semaphore.run(threads.deferToThreadPool, self.reactor, self.pool,
                               self.directory.verify, user, password)
        d.addCallbacks(self._found, self._failed, callbackArgs=(user, password))
        return d

    def _found(self, found: DirectoryUser, user: str, password: str) -> Identity:
        self._healthy()
        identity = self.identity(user, found)
        self.cache.put(user, password, identity)
        return identity

    def _failed(self, failure: Any) -> None:
        if failure.check(BadCredentials):
            self._healthy()  # the directory answered
            raise UnauthorizedLogin(failure.getErrorMessage())
        self._sick(failure.getErrorMessage() if failure.check(DirectoryError)
                   else f"{failure.type.__name__}: {failure.getErrorMessage()}")
        raise BackendUnavailable("directory unavailable")

    # -- breaker --------------------------------------------------------------------------
    def _admit(self) -> bool:
        if self._open_until is None:
            return True
        if self.reactor.seconds() < self._open_until or self._probing:
            return False
        self._probing = True  # half-open: this check is the probe
        return True

    def _healthy(self) -> None:
        if self._open_until is not None:
            log.info("LDAP directory answers again: breaker closed")
        self._failures, self._open_until, self._probing = 0, None, False

    def _sick(self, reason: str) -> None:
        self._failures += 1
        log.warn("LDAP directory error ({n} in a row): {reason}", n=self._failures,
                 reason=reason)
        if self._probing or self._failures >= self.section.breaker_failures:
            if not self._probing:
                log.error("LDAP directory marked down for {s:g}s: logins get 454 at once",
                          s=self.section.breaker_cooldown)
            self._open_until = self.reactor.seconds() + self.section.breaker_cooldown
        self._probing = False

    # -- attributes -----------------------------------------------------------------------
    def identity(self, user: str, found: DirectoryUser) -> Identity:
        s = self.section
        attrs = found.attributes
        senders = _senders(attrs, s.sender_attributes, user)
        attributes: dict[str, Any] = {"dn": found.dn}
        groups = tuple(dict.fromkeys(group_name(g, s.group_name_attribute)
                                     for g in found.groups))
        if groups:
            attributes["groups"] = groups
            attributes["group_dns"] = tuple(found.groups)
        if s.class_attribute and (values := attrs.get(s.class_attribute)):
            attributes["class"] = values[0].strip()
        if s.options_attribute and (values := attrs.get(s.options_attribute)):
            defaults = option_defaults(values)
            if defaults:
                attributes["option_defaults"] = defaults
        return Identity(user, "ldap", senders, attributes)


def _senders(attrs: Mapping[str, tuple[str, ...]], names: Iterable[str],
             user: str) -> tuple[str, ...]:
    """Addresses from the sender attributes; proxyAddresses keep only ``smtp:`` ones."""
    out: list[str] = []
    for name in names:
        for value in attrs.get(name) or ():
            value = value.strip()
            scheme, colon, rest = value.partition(":")
            if colon and "@" not in scheme:
                if scheme.lower() != "smtp":
                    continue  # x500:, sip:, X400: ... are not mail addresses
                value = rest
            try:
                out.extend(SenderPolicy.parse([value]).patterns)
            except ValueError:
                log.warn("LDAP user {user}: ignoring {attr} value {value!r}: not an address",
                         user=user, attr=name, value=value[:100])
    return tuple(dict.fromkeys(out))


def option_defaults(values: Iterable[str]) -> dict[str, Any]:
    """``["job_option=CreateReport,SendReport", "X-LinkOption=0"]`` ->
    ``{"job_option": ("CreateReport", "SendReport"), "link_option": 0}``.

    Keys are the ``[options.defaults]`` keys or the header names; flag values may list
    names separated by commas.  The X-Header policy validates the values at use (a broken
    one refuses the message with a 451 that names the account)."""
    out: dict[str, Any] = {}
    for value in values:
        key, eq, raw = value.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key:
            log.warn("LDAP option default {value!r} ignored: expected Header=value",
                     value=value[:100])
            continue
        header = X.BY_KEY.get(key.lower()) or X.BY_NAME.get(key.lower())
        if header is None:
            log.warn("LDAP option default {key!r} ignored: no such header", key=key[:60])
            continue
        if raw.isdigit():
            out[header.key] = int(raw)
        elif header.bitwise and "," in raw:
            out[header.key] = tuple(part.strip() for part in raw.split(",") if part.strip())
        else:
            out[header.key] = raw
    return out

