"""The composition root: a frozen Config in, a running gateway (a MultiService) out.

Order of flow: listeners (smtpd) → sink (spool, then scheduler) → relay → smarthost.
Nothing here reads the global reactor; ``tap`` passes it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway import reply as R
from gateway import tls
from gateway.auth import AuthThrottle, make_portal
from gateway.auth_file import FileChecker
from gateway.auth_ldap import LdapChecker
from gateway.auth_omicard import OmicardChecker
from gateway.config import Config, ListenerSection, describe
from gateway.config_auth import configured_backends
from gateway.control import ControlService, QueueControl
from gateway.envelope import Envelope
from gateway.listener import ConnectionCounter, ListenerContext, ListenerSettings
from gateway.optionpolicy import XHeaderPolicy
from gateway.ratelimit import LimitStore, RateLimiter
from gateway.ratelimit_local import LocalStore
from gateway.ratelimit_redis import RedisStore
from gateway.relay import SmarthostRelay
from gateway.reply import ReplyError
from gateway.scheduler import Scheduler
from gateway.sendrate import send_rate
from gateway.smtpd import GatewaySMTPFactory
from gateway.spool import Spool, SpoolError, SpoolFull
from gateway.upstream import CredentialSealer, UpstreamPolicy, load_key

log = Logger()
CONTROL_SOCKET = "control.sock"  # in gateway.state_dir; `itpison-gateway queue` talks to it


class QueueSink:
    """Accepted mail goes to disk first, then to the scheduler.  Spool failures become
    the replies the client must see (never a 250)."""

    def __init__(self, spool: Spool, scheduler: Scheduler) -> None:
        self.spool = spool
        self.scheduler = scheduler

    def submit(self, envelope: Envelope, message: bytes) -> defer.Deferred[None]:
        d = self.spool.submit(envelope, message)

        def durable(_: object) -> None:
            self.scheduler.enqueue(envelope, message)

        def failed(failure: Failure) -> None:
            # A full disk and an unwritable spool both mean "storage": 452 4.3.1.
            if failure.check(SpoolFull, SpoolError):
                raise ReplyError(R.SPOOL_FULL, failure.getErrorMessage())
            failure.raiseException()

        return d.addCallbacks(durable, failed)


def _limit_store(config: Config, reactor: Any) -> LimitStore:
    """Redis when ``[ratelimit] redis`` is set (with the in-process store as its fail-open
    fallback), else the in-process store."""
    local = LocalStore(reactor)
    if config.ratelimit.redis is None:
        return local
    return RedisStore(config.ratelimit, reactor, local)


class GatewayService(service.MultiService):
    """Listeners, spool, scheduler and relay for one Config."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.ports: list[IListeningPort] = []
        self.contexts: list[ListenerContext] = []
        self.spool_pool = ThreadPool(minthreads=1, maxthreads=4, name="spool")
        self.auth_pool = ThreadPool(minthreads=1, maxthreads=4, name="auth")
        self.spool = Spool(config.gateway.state_dir / "spool", reactor, self.spool_pool)
        self.upstream = self._upstream()
        self.relay = SmarthostRelay(config.smarthosts, config.relay, config.gateway.hostname,
                                    reactor, upstream=self.upstream)
        self.limiter = RateLimiter(config.ratelimit, _limit_store(config, reactor), reactor)
        self.limiter.setServiceParent(self)
        self.scheduler = Scheduler(self.spool, self.relay, config.queue, config.gateway.hostname,
                                   reactor, send_rate=send_rate(config.relay.messages_per_second,
                                                                reactor),
                                   outbound=self.limiter)
        self.scheduler.setServiceParent(self)
        self.control = ControlService(
            QueueControl(self.scheduler, config.gateway.state_dir / "spool", reactor,
                         self.spool_pool), config.gateway.state_dir / CONTROL_SOCKET, reactor)
        self.control.setServiceParent(self)
        self.sink = QueueSink(self.spool, self.scheduler)
        self.connections = ConnectionCounter(config.limits.max_connections,
                                             config.limits.max_connections_per_ip)
        self.throttle = AuthThrottle(config.auth.max_failures, config.auth.failure_window,
                                     store=self.limiter.store)
        self.checkers = self._checkers()
        self._portals: dict[tuple[str, ...], Portal] = {}
        self.options = XHeaderPolicy(config.options)

    def _checkers(self) -> dict[str, Any]:
        """One checker per backend configured in ``[auth]``, by name."""
        auth = self.config.auth
        checkers: dict[str, Any] = {}
        if auth.ldap is not None:
            ldap = LdapChecker(auth.ldap, self.reactor)
            ldap.setServiceParent(self)
            checkers["ldap"] = ldap
        if auth.omicard is not None:
            checkers["omicard"] = OmicardChecker(auth.omicard, self.config.smarthosts,
                                                 self.config.relay, self.config.gateway.hostname,
                                                 self.reactor, connector=self.relay.connector)
        if auth.users_file is not None:
            checkers["file"] = FileChecker(auth.users_file, self.reactor, self.auth_pool)
        return checkers

    def _upstream(self) -> UpstreamPolicy | None:
        """Per-user and per-group upstream accounts; None: everything under the global one.
        The credential key is loaded (or made) only when OMICard users relay as themselves."""
        auth = self.config.auth
        sealer = None
        if auth.omicard is not None and auth.omicard.relay_as_user:
            sealer = CredentialSealer(load_key(auth.omicard.key_file,
                                               self.config.gateway.state_dir))
        if sealer is None and not auth.upstream_accounts:
            return None
        return UpstreamPolicy(sealer, auth.upstream_accounts)

    def portal_for(self, listener: ListenerSection) -> Portal | None:
        """The listener's checker chain (``auth = [...]``, default: every backend, in the
        order ldap, omicard, file); one portal per distinct chain."""
        names = listener.auth or configured_backends(self.config.auth)
        names = tuple(n for n in names if n in self.checkers)
        if not names:
            return None
        if names not in self._portals:
            self._portals[names] = make_portal([self.checkers[n] for n in names], self.reactor,
                                               self.config.auth.failure_floor)
        return self._portals[names]

    def _certificate(self, listener: ListenerSection) -> tuple[Path, Path]:
        if listener.certificate is not None and listener.private_key is not None:
            return listener.certificate, listener.private_key
        if self.config.tls.certificate is not None and self.config.tls.private_key is not None:
            return self.config.tls.certificate, self.config.tls.private_key
        return tls.ensure_self_signed(self.config.gateway.state_dir / "tls",
                                      self.config.gateway.hostname)

    def build_factories(self) -> list[tuple[ListenerSection, Any]]:
        """One factory per listener (smtps ones wrapped in TLS from the first byte)."""
        out = []
        for listener in self.config.listeners:
            cert, key = self._certificate(listener)
            creator = tls.server_creator(cert, key, listener.tls_min_version)
            context = ListenerContext(
                settings=ListenerSettings.from_config(listener, self.config),
                clock=self.reactor, portal=self.portal_for(listener),
                starttls_creator=None if listener.mode == "smtps" else creator,
                sink=self.sink, throttle=self.throttle, connections=self.connections,
                options=self.options, limiter=self.limiter, upstream=self.upstream)
            self.contexts.append(context)
            factory: Any = GatewaySMTPFactory(context)
            if listener.mode == "smtps":
                factory = TLSMemoryBIOFactory(creator, False, factory)
            out.append((listener, factory))
        return out

    def startService(self) -> None:
        for line in describe(self.config):
            log.info("{line}", line=line)
        self.config.gateway.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool.open()
        self.spool_pool.start()
        self.auth_pool.start()
        factories = self.build_factories()
        super().startService()  # the scheduler scans the spool
        for listener, factory in factories:
            self._listen(listener, factory)

    def _listen(self, listener: ListenerSection, factory: Any) -> None:
        endpoint = serverFromString(self.reactor, listener.endpoint)
        d = endpoint.listen(factory)
        result: list[Any] = []
        d.addBoth(result.append)
        # Endpoints from serverFromString listen synchronously (tcp, unix, systemd): a
        # port in use must stop the start-up, not leave a half-started gateway.
        if not result:
            raise RuntimeError(f"listener {listener.name}: {listener.endpoint} did not start")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        port = result[0]
        self.ports.append(port)
        log.info("listening on {address} ({mode}, {name})", address=port.getHost(),
                 mode=listener.mode, name=listener.name)

    def _close_relay(self, _: object) -> defer.Deferred[Any]:
        """QUIT the pooled smarthost connections; a stop never waits long for a polite QUIT."""
        closing = self.relay.close()
        closing.addTimeout(min(self.config.relay.command_timeout, 5.0), self.reactor)
        return closing.addErrback(lambda f: log.warn("closing smarthost connections: {e}",
                                                     e=f.getErrorMessage()))

    def stopService(self) -> defer.Deferred[None]:
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(p.stopListening) for p in ports]
        for context in self.contexts:
            for session in list(context.sessions):
                session.shutdown()
        d = defer.gatherResults(stopping, consumeErrors=True)
        d.addBoth(lambda _: super(GatewayService, self).stopService())
        d.addBoth(self._close_relay)

        def pools(result: Any) -> Any:
            self.spool_pool.stop()
            self.auth_pool.stop()
            return result

        return d.addBoth(pools)
