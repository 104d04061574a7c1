"""AUTH for a listener session (RFC 4954): PLAIN and LOGIN, under TLS only, through the
twisted.cred portal, with the failure throttle per client address and per user name.

A mixin of ``smtpd.GatewaySMTP``: it uses the session's state (``context``, ``settings``,
``helo``, ``principal``, ``sender``, ``client_ip``) and its reply plumbing (``_refuse``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import maillog
from gateway import reply as R
from gateway.auth import BackendUnavailable, IPrincipal, Principal
from gateway.ratelimit import LimiterUnavailable
from gateway.reply import Reply, ReplyError
from gateway.smtpauth import Credentials, exchange_for

log = Logger(namespace="gateway.smtpd")


class SessionAuth:
    """The AUTH command and its exchange; ``_exchange`` is set while one is running."""

    context: Any
    settings: Any

    def cmd_AUTH(self, arg: str) -> Reply | Deferred[Reply | None] | None:
        if not self.tls_active:
            raise ReplyError(R.ENCRYPTION_REQUIRED, "AUTH before TLS")
        if self.context.portal is None or not self.settings.mechanisms:
            raise ReplyError(R.NOT_IMPLEMENTED, "no authentication backend")
        if self.helo is None:
            raise ReplyError(R.NEED_HELO, "AUTH before EHLO")
        if self.principal is not None:
            raise ReplyError(R.ALREADY_AUTHENTICATED, "second AUTH")
        if self.sender is not None:
            raise ReplyError(R.BAD_SEQUENCE, "AUTH during a mail transaction")
        parts = arg.split()
        if not parts or len(parts) > 2:
            raise ReplyError(R.SYNTAX_ERROR, "AUTH needs a mechanism")
        mechanism = parts[0].upper()
        if mechanism not in self.settings.mechanisms:
            raise ReplyError(R.AUTH_MECHANISM, f"mechanism {mechanism[:20]!r}")
        initial = parts[1].encode() if len(parts) == 2 else None

        def decided(blocked: bool) -> Reply | Deferred[Reply | None] | None:
            if blocked:
                raise ReplyError(R.TOO_MANY_AUTH_FAILURES, "client is over the AUTH failure limit")
            self._exchange = exchange_for(mechanism)
            return self._auth_result(lambda: self._exchange.start(initial))  # type: ignore[union-attr]

        d = self.context.throttle.blocked(self.client_ip)
        d.addErrback(self._throttle_unavailable)
        return d.addCallback(decided).addErrback(self._refused_async, "AUTH")

    def _throttle_unavailable(self, failure: Failure) -> bool:
        failure.trap(LimiterUnavailable)
        raise ReplyError(R.AUTH_UNAVAILABLE, "AUTH throttle store unavailable (fail_closed)")

    def _refused_async(self, failure: Failure, stage: str) -> None:
        failure.trap(ReplyError)
        self._refuse(stage, failure.value)
        return None

    def _auth_step(self, line: bytes) -> Reply | Deferred[Reply | None] | None:
        return self._auth_result(lambda: self._exchange.step(line))  # type: ignore[union-attr]

    def _auth_result(self, advance: Callable[[], bytes | Credentials]) -> Reply | Deferred[Reply | None] | None:
        exchange = self._exchange
        assert exchange is not None
        try:
            outcome = advance()
        except ReplyError as e:
            self._exchange = None
            maillog.auth_failed(self.session, self.client_ip, exchange.username,
                                exchange.mechanism, e.reason)
            raise
        if isinstance(outcome, bytes):
            self.transport.write(b"334 " + outcome + b"\r\n")
            return None
        self._exchange = None

        def login(blocked: bool) -> Deferred[Reply]:
            if blocked:
                maillog.auth_failed(self.session, self.client_ip, outcome.username,
                                    exchange.mechanism, "user name over the AUTH failure limit")
                return R.TOO_MANY_AUTH_FAILURES
            d = self.context.portal.login(UsernamePassword(outcome.username.encode(),
                                                           outcome.password.encode()),
                                          None, IPrincipal)
            return d.addCallbacks(self._auth_ok, self._auth_failed,
                                  callbackArgs=(exchange.mechanism,),
                                  errbackArgs=(exchange.mechanism, outcome.username))

        d = self.context.throttle.user_blocked(outcome.username)
        d.addErrback(self._throttle_unavailable)
        return d.addCallback(login).addErrback(self._refused_async, "AUTH")

    def _auth_ok(self, result: tuple[Any, Principal, Callable[[], None]], mechanism: str) -> Reply:
        _iface, principal, logout = result
        if self._closed:
            logout()
            return R.AUTH_OK
        self.principal, self._logout = principal, logout
        maillog.auth_ok(self.session, self.client_ip, principal.name, mechanism,
                        principal.backend)
        return R.AUTH_OK

    def _auth_failed(self, failure: Failure, mechanism: str,
                     username: str) -> Reply | Deferred[Reply]:
        if failure.check(UnauthorizedLogin):
            throttle = self.context.throttle

            def counted(count: int | None) -> Reply:
                maillog.auth_failed(self.session, self.client_ip, username, mechanism,
                                    f"bad credentials ({count if count is not None else '?'}"
                                    " recent failures)")
                if count is not None and count >= throttle.max_failures:
                    return R.TOO_MANY_AUTH_FAILURES
                return R.AUTH_FAILED

            d = throttle.record_failure(self.client_ip, username)
            d.addErrback(lambda f: f.trap(LimiterUnavailable) and None)
            return d.addCallback(counted)
        reason = "backend unavailable" if failure.check(BackendUnavailable) else repr(failure.value)
        if not failure.check(BackendUnavailable):
            log.failure("{session} authentication error", failure, session=self.session)
        maillog.auth_failed(self.session, self.client_ip, username, mechanism, reason)
        return R.AUTH_UNAVAILABLE
