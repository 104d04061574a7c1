"""The composition root: a frozen Config in, a running gateway (a MultiService) out.

Order of flow: listeners (smtpd) → sink (spool, then scheduler) → relay → smarthost.
Nothing here reads the global reactor; ``tap`` passes it in.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway import reply as R
from gateway import tls
from gateway.auth import AuthThrottle
from gateway.authsetup import AuthBackends, upstream_policy
from gateway.certs import CertificateSource, CertificateWatcher, SwappableServerTLS
from gateway.config import Config, ListenerSection, describe, worker_share
from gateway.control import ControlService, QueueControl
from gateway.envelope import Envelope
from gateway.listener import ConnectionCounter, ListenerContext, ListenerSettings
from gateway.metrics import GatewayMetrics
from gateway.optionpolicy import XHeaderPolicy
from gateway.ownership import QueueOwnership
from gateway.proxyproto import ProxyProtocolFactory
from gateway.ratelimit import LimitStore, RateLimiter
from gateway.ratelimit_local import LocalStore
from gateway.ratelimit_redis import RedisStore
from gateway.relay import SmarthostRelay
from gateway.reload import Reloader, load_again
from gateway.reply import ReplyError
from gateway.scheduler import Scheduler
from gateway.sdnotify import Notifier, WatchdogService
from gateway.sendrate import send_rate
from gateway.smtpd import GatewaySMTPFactory
from gateway.spool import Spool, SpoolError, SpoolFull
from gateway.webops import OperationsWebService, worker_commands

log = Logger()
CONTROL_SOCKET = "control.sock"  # in gateway.state_dir; `itpison-gateway queue` talks to it
WORKER_SOCKETS = "workers"  # state_dir/workers/<index>.sock: a worker's control socket


@dataclass(frozen=True)
class WorkerRole:
    """This GatewayService is worker ``index`` of ``count`` under a supervisor
    (gateway.supervisor): it adopts the listening sockets it inherited as ``fds`` (listener
    name -> file descriptor), holds only its queue slots, answers its own control socket,
    and leaves /metrics and systemd to the supervisor."""

    index: int
    count: int
    fds: dict[str, int] = field(default_factory=dict)


def certificate_for(listener: ListenerSection, config: Config) -> tuple[Path, Path]:
    """The listener's certificate and key: its own, else ``[tls]``, else the self-signed
    pair in state_dir/tls (made when missing or about to expire)."""
    if listener.certificate is not None and listener.private_key is not None:
        return listener.certificate, listener.private_key
    if config.tls.certificate is not None and config.tls.private_key is not None:
        return config.tls.certificate, config.tls.private_key
    return tls.ensure_self_signed(config.gateway.state_dir / "tls", config.gateway.hostname)


def worker_socket(state_dir: Path, index: int) -> Path:
    return state_dir / WORKER_SOCKETS / f"{index}.sock"


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

    def __init__(self, config: Config, reactor: Any, notifier: Notifier | None = None,
                 worker: WorkerRole | None = None) -> None:
        super().__init__()
        self.worker = worker
        if worker is not None:
            config = worker_share(config)
        self.config = config
        self.reactor = reactor
        self.notifier = notifier or Notifier({})  # systemd's, from tap; a no-op by default
        self.stopping = False
        self.ports: list[IListeningPort] = []
        self.contexts: list[ListenerContext] = []
        self.tls_creators: dict[str, SwappableServerTLS] = {}  # listener name -> creator
        self._retiring: list[defer.Deferred[Any]] = []  # relays replaced by a reload
        self._drained: list[defer.Deferred[None]] = []
        self.spool_pool = ThreadPool(minthreads=1, maxthreads=4, name="spool")
        self.auth_pool = ThreadPool(minthreads=1, maxthreads=4, name="auth")
        spool_root = config.gateway.state_dir / "spool"
        self.ownership = (QueueOwnership(spool_root) if worker is None
                          else QueueOwnership(spool_root, worker.index, worker.count))
        self.spool = Spool(spool_root, reactor, self.spool_pool, self.ownership)
        self.upstream = upstream_policy(config)
        self.relay = SmarthostRelay(config.smarthosts, config.relay, config.gateway.hostname,
                                    reactor, upstream=self.upstream)
        self.limiter = RateLimiter(config.ratelimit, _limit_store(config, reactor), reactor)
        self.limiter.setServiceParent(self)
        self.scheduler = Scheduler(self.spool, self.relay, config.queue, config.gateway.hostname,
                                   reactor, send_rate=send_rate(config.relay.messages_per_second,
                                                                reactor),
                                   outbound=self.limiter)
        self.scheduler.setServiceParent(self)
        control_path = (config.gateway.state_dir / CONTROL_SOCKET if worker is None
                        else worker_socket(config.gateway.state_dir, worker.index))
        self.control = ControlService(
            QueueControl(self.scheduler, spool_root, reactor, self.spool_pool,
                         extra=worker_commands(self) if worker else None),
            control_path, reactor)
        self.control.setServiceParent(self)
        self.sink = QueueSink(self.spool, self.scheduler)
        self.connections = ConnectionCounter(config.limits.max_connections,
                                             config.limits.max_connections_per_ip)
        self.throttle = AuthThrottle(config.auth.max_failures, config.auth.failure_window,
                                     store=self.limiter.store)
        self.auth = AuthBackends(config, reactor, self.auth_pool, self.relay.connector)
        for backend in self.auth.services:
            backend.setServiceParent(self)
        self.options = XHeaderPolicy(config.options)
        self.reloader = Reloader(self, load_again if worker is None else self._load_for_worker)
        self.metrics = GatewayMetrics(self, "+".join(self.auth.checkers) or "none",
                                      census=worker is None)
        CertificateWatcher(lambda: list(self.tls_creators.values()),
                           config.service.certificate_check_interval, reactor
                           ).setServiceParent(self)
        WatchdogService(self.notifier, reactor).setServiceParent(self)
        self.web: OperationsWebService | None = None
        # Counters are kept only when /metrics is served: here, or by the supervisor.
        self.metrics_on = config.metrics.endpoint is not None
        if self.metrics_on and worker is None:
            self.web = OperationsWebService(self, config.metrics.endpoint)

    def _load_for_worker(self, current: Config) -> Config:
        """A worker re-reads the file with its worker count pinned (a new count needs a
        restart, which the supervisor says), then takes its share."""
        new = load_again(current)
        if new.service.workers != self.worker.count:
            new = replace(new, service=replace(new.service, workers=self.worker.count))
        return worker_share(new)


    def certificate_for(self, listener: ListenerSection, config: Config) -> tuple[Path, Path]:
        return certificate_for(listener, config)

    def build_factories(self) -> list[tuple[ListenerSection, Any]]:
        """One factory per listener (smtps ones wrapped in TLS from the first byte, and
        PROXY protocol outermost where the listener takes it)."""
        out = []
        for listener in self.config.listeners:
            cert, key = self.certificate_for(listener, self.config)
            creator = SwappableServerTLS(CertificateSource(cert, key, listener.tls_min_version))
            self.tls_creators[listener.name] = creator
            context = ListenerContext(
                settings=ListenerSettings.from_config(listener, self.config),
                clock=self.reactor, portal=self.auth.portal_for(listener),
                starttls_creator=None if listener.mode == "smtps" else creator,
                sink=self.sink, throttle=self.throttle, connections=self.connections,
                options=self.options, limiter=self.limiter, upstream=self.upstream,
                on_close=self._session_closed, new_id=self.spool.new_id)
            self.contexts.append(context)
            factory: Any = GatewaySMTPFactory(context)
            if listener.mode == "smtps":
                factory = TLSMemoryBIOFactory(creator, False, factory)
            if listener.proxy_protocol_from:
                factory = ProxyProtocolFactory(factory, listener.proxy_protocol_from,
                                               self.reactor, listener.name)
            out.append((listener, factory))
        return out

    def reload(self) -> bool:
        """Re-read the configuration file and apply it (see gateway.reload)."""
        return self.reloader.reload()

    def retire_relay(self, old: SmarthostRelay) -> None:
        """A reload replaced ``old``: its deliveries in flight finish, then it QUITs."""
        d = old.close()
        self._retiring.append(d)
        d.addBoth(lambda r: (self._retiring.remove(d), r)[1])

    def status_text(self) -> str:
        return (f"accepting on {len(self.ports)} listeners; "
                f"{len(self.scheduler.in_flight)} deliveries in flight")

    def _open_sessions(self) -> int:
        return sum(len(c.sessions) for c in self.contexts)

    def _session_closed(self) -> None:
        if self._drained and self._open_sessions() == 0:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _sessions_done(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        self._session_closed()
        return d

    def startService(self) -> None:
        if self.worker is None:
            for line in describe(self.config):
                log.info("{line}", line=line)
        else:  # the supervisor logged the configuration; this is the worker's share of it
            c = self.config
            log.info("worker {index} of {count}: max_connections={conn} concurrency={conc}"
                     " max_connections_per_host={pool} messages_per_second={rate:g}",
                     index=self.worker.index, count=self.worker.count,
                     conn=c.limits.max_connections, conc=c.queue.concurrency,
                     pool=c.relay.max_connections_per_host, rate=c.relay.messages_per_second)
        self.config.gateway.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool.open()
        # Before the scan, and before a 250 can name a queue id: the slots are ours alone.
        self.ownership.acquire(timeout=self.config.service.stop_timeout + 15.0)
        try:
            self._start()
        except BaseException:
            self._abandon_start()
            raise
        self.notifier.ready(self.status_text())

    def _start(self) -> None:
        self.spool_pool.start()
        self.auth_pool.start()
        factories = self.build_factories()
        if self.metrics_on:  # the counters only serve /metrics: none without it
            globalLogPublisher.addObserver(self.metrics.observer)
        super().startService()  # the scheduler scans the spool
        for listener, factory in factories:
            self._listen(listener, factory)
        if self.web is not None:
            self.web.startService()

    def _abandon_start(self) -> None:
        """A start that failed (a port in use, a control socket another gateway holds)
        undoes what it did, so that twistd exits with the error instead of hanging on
        the thread pools' threads."""
        for port in self.ports:
            port.stopListening()
        self.ports = []
        if self.running:
            for child in reversed(list(self)):
                if child.running:
                    child.stopService()
            self.running = False
        for pool in (self.spool_pool, self.auth_pool):
            if pool.started:
                pool.stop()
        if self.metrics_on:
            globalLogPublisher.removeObserver(self.metrics.observer)
        self.ownership.release()

    def _listen(self, listener: ListenerSection, factory: Any) -> None:
        if self.worker is not None:
            port = _adopt(self.reactor, self.worker.fds[listener.name], factory)
            self.ports.append(port)
            return
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

    async def _drain(self) -> None:
        """Stop accepting; idle sessions get 421 4.3.2 now, transactions in progress get
        ``service.stop_timeout`` to finish (then 421 too)."""
        self.notifier.stopping()
        self.stopping = True
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(p.stopListening) for p in ports]
        if self.web is not None:
            stopping.append(defer.maybeDeferred(self.web.stopService))
        await defer.gatherResults(stopping, consumeErrors=True).addErrback(
            lambda f: log.warn("closing listeners: {e}", e=f.getErrorMessage()))
        sessions = [s for c in self.contexts for s in c.sessions]
        for session in sessions:
            session.shutdown(drain=True)
        if self._open_sessions():
            log.info("stopping: waiting up to {timeout}s for {n} sessions",
                     timeout=self.config.service.stop_timeout, n=self._open_sessions())
            done = self._sessions_done()
            done.addTimeout(self.config.service.stop_timeout, self.reactor)
            try:
                await done
            except defer.TimeoutError:
                for context in self.contexts:
                    for session in list(context.sessions):
                        session.shutdown()
                # A commit in flight still answers (its fsync is in the spool pool).
                last = self._sessions_done()
                last.addTimeout(5.0, self.reactor)
                await last.addErrback(lambda f: f.trap(defer.TimeoutError))

    def _close_relay(self, _: object) -> defer.Deferred[Any]:
        """QUIT the pooled smarthost connections; a stop never waits long for a polite QUIT."""
        closing = defer.gatherResults([self.relay.close(), *self._retiring], consumeErrors=True)
        closing.addTimeout(min(self.config.relay.command_timeout, 5.0), self.reactor)
        return closing.addErrback(lambda f: log.warn("closing smarthost connections: {e}",
                                                     e=f.getErrorMessage()))

    def stopService(self) -> defer.Deferred[None]:
        d = defer.Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: log.failure("stopping the listeners", f))
        d.addBoth(lambda _: super(GatewayService, self).stopService())
        d.addBoth(self._close_relay)

        def pools(result: Any) -> Any:
            self.spool_pool.stop()
            self.auth_pool.stop()
            self.ownership.release()  # the scheduler has stopped: nothing of ours in flight
            if self.metrics_on:
                globalLogPublisher.removeObserver(self.metrics.observer)
            self.notifier.close()
            return result

        return d.addBoth(pools)


def _adopt(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """Accept on a listening socket inherited from the supervisor (``adoptStreamPort``
    duplicates it, so the inherited descriptor is closed afterwards)."""
    probe = socket.socket(fileno=fd)
    try:
        family = probe.family
    finally:
        probe.detach()
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    _one_accept_per_wakeup(port)
    return port


def _one_accept_per_wakeup(port: Any) -> None:
    """Every worker is woken for a new connection; the first to call accept() gets it.
    Twisted accepts up to ``numberAccepts`` (growing by 20) per wake-up, so one worker
    would take a whole burst of connections while the others get nothing.  Accepting one
    at a time leaves the next connection to whichever worker is idle first: a busy worker
    comes back to its listening socket later, so the load spreads by itself."""
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return accept()

    port.doRead = doRead
