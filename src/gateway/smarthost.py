"""Opening a session to one smarthost: connect (trying its fallback ports), TLS, EHLO, AUTH.

``SmarthostConnector`` is the pool's ``Connector`` for SMTP: ``create(index)`` returns a
``Session`` ready for MAIL FROM, or raises ``trouble.Failed`` saying where and why it
could not (classified in gateway.trouble, like everything else).  Ports are tried in the
order of the smarthost's ``routes`` (its own port, then ``fallbacks``) but only while a
port is *unreachable* (refused, timed out): a TLS or SMTP failure on a reachable port is
the host's answer, and the next port would not change it.  The port that worked last is
remembered for ``ROUTE_MEMORY`` seconds, so a blocked 465 does not cost a connect
timeout for every new connection.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from gateway.config import RelaySection, SmarthostSection
from gateway.smtpclient import ClientTimeouts, SMTPClientFactory, SMTPClientProtocol
from gateway.tls import client_creator
from gateway.trouble import CONFIG_NEXT, Failed, error_failure, is_unreachable, reply_failure

log = Logger(namespace="gateway.relay")

ROUTE_MEMORY = 600.0  # seconds a fallback port that worked is tried first


@dataclass(eq=False)
class Session:
    """A connected, greeted (and authenticated) SMTP session to one smarthost port."""

    index: int  # the smarthost's position in the configuration
    address: str  # host:port actually connected to
    client: SMTPClientProtocol


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SmarthostConnector:
    """Implements ``gateway.pool.Connector[Session]``; the key is the smarthost index
    (AUTH with the smarthost's configured account, if any), or ``(index, account)`` with
    an ``upstream.UpstreamAccount`` to AUTH as instead (a user's own, or a group's)."""

    def __init__(self, smarthosts: Sequence[SmarthostSection], cfg: RelaySection,
                 hostname: str, reactor: Any) -> None:
        self.smarthosts = tuple(smarthosts)
        self.cfg = cfg
        self.hostname = hostname
        self.reactor = reactor
        self.timeouts = ClientTimeouts(greeting=cfg.greeting_timeout,
                                       command=cfg.command_timeout, data=cfg.data_timeout)
        # Built once: a missing CA file is a startup error, not a delivery failure.
        self._creators: dict[int, IOpenSSLClientConnectionCreator] = {
            i: client_creator(h.verify_name, h.ca_file)
            for i, h in enumerate(self.smarthosts)
            if any(security != "none" for _, security in h.routes)}
        self._preferred: dict[int, tuple[int, float]] = {}  # index -> (route, since)
        self._closing: set[defer.Deferred[None]] = set()

    # --- Connector ----------------------------------------------------------------------
    def create(self, key: Hashable) -> defer.Deferred[Session]:
        index, account = key if isinstance(key, tuple) else (key, None)
        assert isinstance(index, int)
        return defer.Deferred.fromCoroutine(self._create(index, account))

    def usable(self, conn: Session) -> bool:
        return conn.client.usable

    def close(self, conn: Session) -> None:
        """QUIT in the background (bounded by the command deadline), or drop the line."""
        client = conn.client
        if client.usable:
            defer.Deferred.fromCoroutine(client.quit()).addErrback(lambda _f: None)
        else:
            client.abort()
        closed = client.when_closed()
        if not closed.called:
            self._closing.add(closed)
            closed.addBoth(lambda _: self._closing.discard(closed))

    def wait_closed(self) -> defer.Deferred[Any]:
        return defer.gatherResults(list(self._closing))

    # --- opening a session ----------------------------------------------------------------
    def _route_order(self, index: int) -> list[int]:
        routes = list(range(len(self.smarthosts[index].routes)))
        preferred = self._preferred.get(index)
        if preferred is not None and self.reactor.seconds() - preferred[1] < ROUTE_MEMORY:
            routes.remove(preferred[0])
            routes.insert(0, preferred[0])
        return routes

    async def _create(self, index: int, account: Any = None) -> Session:
        host = self.smarthosts[index]
        last: Failed | None = None
        for route in self._route_order(index):
            port, security = host.routes[route]
            address = _address(host.host, port)
            try:
                client = await self._connect(index, host, port, security)
            except defer.CancelledError:
                raise
            except Exception as exc:
                last = error_failure("connect", address, host.verify_name, exc, reached=False)
                if not is_unreachable(exc):
                    raise last from None
                if len(host.routes) > 1:
                    log.warn("smarthost {address} unreachable ({reason}); trying its next "
                             "port", address=address, reason=last.text)
                continue
            if route != 0:
                self._preferred[index] = (route, self.reactor.seconds())
            else:
                self._preferred.pop(index, None)
            session = Session(index, address, client)
            try:
                await self._handshake(index, host, security, session, account)
            except BaseException:
                self.close(session)
                raise
            return session
        assert last is not None
        raise last

    async def _connect(self, index: int, host: SmarthostSection, port: int,
                       security: str) -> SMTPClientProtocol:
        implicit = self._creators[index] if security == "smtps" else None
        factory = SMTPClientFactory(self.reactor, self.timeouts, tls_on_connect=implicit)
        endpoint = HostnameEndpoint(self.reactor, host.host, port,
                                    timeout=self.cfg.connect_timeout)
        connecting = endpoint.connect(factory)
        connecting.addTimeout(self.cfg.connect_timeout, self.reactor)  # DNS has no deadline
        return await connecting

    async def _handshake(self, index: int, host: SmarthostSection, security: str,
                         session: Session, account: Any = None) -> None:
        """Greeting, EHLO, STARTTLS + EHLO, AUTH: ready for MAIL, or raises Failed."""
        client, address = session.client, session.address
        stage = "greeting"
        try:
            self._expect("greeting", await client.greeting(), 220, address)
            stage = "ehlo"
            self._expect("ehlo", await client.ehlo(self.hostname), 250, address)
            if security == "starttls":
                stage = "starttls"
                if "STARTTLS" not in client.extensions:
                    raise Failed("starttls", CONFIG_NEXT, 0, "", "STARTTLS not offered "
                                 "(refusing to continue in plaintext)", address)
                self._expect("starttls", await client.starttls(self._creators[index]), 220,
                             address)
                stage = "ehlo"
                self._expect("ehlo", await client.ehlo(self.hostname), 250, address)
            if account is not None:
                stage = "auth"
                await self._authenticate(host, client, address, account.username,
                                         account.password)
            elif host.username:
                stage = "auth"
                await self._authenticate(host, client, address, host.username,
                                         host.password or "")
        except (Failed, defer.CancelledError):
            raise
        except Exception as exc:
            raise error_failure(stage, address, host.verify_name, exc, reached=True) from None

    async def _authenticate(self, host: SmarthostSection, client: SMTPClientProtocol,
                            address: str, user: str, password: str) -> None:
        mechanisms = client.extensions.get("AUTH", "").upper().split()
        insecure = host.allow_insecure_auth
        if "PLAIN" in mechanisms:
            reply = await client.auth_plain(user, password, allow_insecure=insecure)
        elif "LOGIN" in mechanisms:
            reply = await client.auth_login(user, password, allow_insecure=insecure)
        else:
            raise Failed("auth", CONFIG_NEXT, 0, "", "no usable AUTH mechanism offered "
                         f"({' '.join(mechanisms) or 'none'})", address)
        self._expect("auth", reply, 235, address)

    @staticmethod
    def _expect(stage: str, reply: Any, code: int, address: str) -> None:
        if reply.code != code:
            raise reply_failure(stage, reply, address)
