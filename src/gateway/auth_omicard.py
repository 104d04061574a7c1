"""The OMICard checker (``[auth.omicard]``): an ITPison customer's sign-in account and
password, checked exactly as ``smtp.itpison.com`` would: by an SMTP AUTH there.

For each attempt the checker opens a session to the configured smarthosts in order
(primary, then backup), with the relay's own connector: the same TLS verification
(``ca_file``, ``tls_name``), fallback ports and deadlines, but the user's credentials
instead of the configured account.  Then it QUITs.

- 235 from a smarthost: the login is good;
- a 5xx to AUTH (535 5.7.8 and the like): ``UnauthorizedLogin``: the backup shares the
  accounts, so it is not asked again;
- anything else (unreachable, TLS failure, 4xx, timeout) on every smarthost:
  ``BackendUnavailable`` (454).

A positive cache (``authcache``, ``cache_ttl``) spares the smarthost a session per login.
The identity carries the credential as ``attributes["upstream"]`` (an ``UpstreamAccount``
whose repr hides the password), so the user's mail goes out under their own account
(gateway.upstream), and ``senders``: the login itself when it is an address
(``senders_from_login``) plus the configured ``senders`` patterns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from gateway.auth import (
    BackendUnavailable,
    Identity,
    SenderPolicy,
    credential_text,
    valid_login,
)
from gateway.authcache import PositiveCache
from gateway.config import RelaySection, SmarthostSection
from gateway.config_auth import OmicardSection
from gateway.smarthost import SmarthostConnector
from gateway.trouble import Failed
from gateway.upstream import UpstreamAccount

log = Logger(namespace="gateway.auth.omicard")


@implementer(ICredentialsChecker)
class OmicardChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, section: OmicardSection, smarthosts: Sequence[SmarthostSection],
                 relay: RelaySection, hostname: str, reactor: Any,
                 connector: SmarthostConnector | None = None) -> None:
        self.section = section
        self.reactor = reactor
        self.smarthosts = tuple(smarthosts)
        self.connector = connector or SmarthostConnector(self.smarthosts, relay, hostname,
                                                         reactor)
        self.cache: PositiveCache[Identity] = PositiveCache(section.cache_ttl, reactor)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Identity]:
        user, password = credential_text(credentials.username), credential_text(credentials.password)
        if user is None or password is None or not valid_login(user) or not password \
                or not self._domain_ok(user):
            return defer.fail(UnauthorizedLogin("not an OMICard login"))
        cached = self.cache.get(user, password)
        if cached is not None:
            return defer.succeed(cached)
        d = defer.Deferred.fromCoroutine(self._verify(user, password))
        d.addTimeout(self.section.timeout * len(self.smarthosts), self.reactor)
        d.addErrback(self._timed_out)
        return d

    def _domain_ok(self, user: str) -> bool:
        if not self.section.domains:
            return True
        return user.rpartition("@")[2].lower() in self.section.domains

    @staticmethod
    def _timed_out(failure: Any) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            raise BackendUnavailable("OMICard check timed out")
        failure.raiseException()

    async def _verify(self, user: str, password: str) -> Identity:
        account = UpstreamAccount(user, password, personal=True)
        errors: list[str] = []
        for index, host in enumerate(self.smarthosts):
            try:
                session = await self.connector.create((index, account))
            except Failed as failed:
                if failed.stage == "auth" and 500 <= failed.code < 600 and failed.code != 530:
                    raise UnauthorizedLogin(f"{host.address}: {failed.code}") from None
                errors.append(f"{host.address}: {failed}")
                continue
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - unknown errors: try the next, then 454
                errors.append(f"{host.address}: {type(e).__name__}: {e}")
                continue
            self.connector.close(session)
            identity = self.identity(user, password)
            self.cache.put(user, password, identity)
            return identity
        log.warn("OMICard check for {user} failed on every smarthost: {errors}", user=user,
                 errors="; ".join(errors))
        raise BackendUnavailable("no smarthost could check the OMICard login")

    def identity(self, user: str, password: str) -> Identity:
        senders = list(self.section.senders)
        if self.section.senders_from_login:
            try:
                senders.extend(SenderPolicy.parse([user]).patterns)
            except ValueError:
                pass  # not an address: only the configured patterns
        attributes: dict[str, Any] = {}
        if self.section.relay_as_user:
            attributes["upstream"] = UpstreamAccount(user, password, personal=True)
        return Identity(user, "omicard", tuple(dict.fromkeys(senders)), attributes)

