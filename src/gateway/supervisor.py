"""``[service] workers = N``: one supervisor process and N workers sharing the listening
sockets and the spool.

The supervisor (what ``twistd -n itpison-gateway`` runs when N > 1) does no SMTP itself:

- it opens every listener and passes the listening sockets to the workers, which accept
  on them (``adoptStreamPort``): for TCP one socket per worker on the same address
  (SO_REUSEPORT: the kernel spreads connections evenly), for unix and systemd's sockets
  one socket shared by all;
- it starts the workers (``python -m gateway.worker``, gateway.worker) and restarts one
  that dies, with a backoff; the new one locks the same queue slots
  (gateway.ownership) as soon as the kernel has dropped the dead one's locks, and
  delivers what it left queued;
- it speaks to systemd: READY=1 once every worker is ready, RELOADING=1 … READY=1
  around a reload it checked and forwarded (SIGHUP) to every worker, STOPPING=1, and
  the watchdog, which also covers the workers: one silent for a whole watchdog interval
  is killed and restarted;
- it serves ``<state_dir>/control.sock`` for ``itpison-gateway queue`` (gateway.fanout)
  and ``[metrics] endpoint`` for the whole node (gateway.supervisor_web);
- SIGTERM: it closes its copies of the sockets, sends SIGTERM to every worker (each
  drains as a single gateway does) and waits for them, SIGKILL after
  ``stop_timeout`` + 20 s.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import replace
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.certs import CertificateSource
from gateway.config import Config, ConfigError, describe
from gateway.config_values import tcp_listen_parameters
from gateway.control import ControlService
from gateway.fanout import FanoutControl
from gateway.reload import load_again
from gateway.sdnotify import Notifier
from gateway.service import CONTROL_SOCKET, WORKER_SOCKETS, certificate_for
from gateway.spool import Spool
from gateway.supervisor_web import NodeMetrics, site
from gateway.webops import OperationsWebService

log = Logger(namespace="gateway.supervisor")

STATUS_FD = 3  # a worker's reports (gateway.worker.PipeNotifier)
FIRST_LISTEN_FD = 4  # the listening sockets follow, in listener order
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")
RESTART_MIN, RESTART_MAX = 0.5, 30.0  # backoff between restarts of a worker that dies early
STABLE_AFTER = 60.0  # a worker that ran this long starts again without backoff
KILL_GRACE = 20.0  # after stop_timeout, before SIGKILL
MAX_STATUS_LINE = 4 * 1024 * 1024  # a log event with a long traceback fits


class WorkerProcess(ProcessProtocol):
    """One running worker, as the supervisor sees it."""

    def __init__(self, supervisor: Supervisor, index: int, started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.ready = False
        self.last_ping = started
        self.pid: int | None = None  # set once spawned (the transport forgets it at exit)
        self._buffer = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != STATUS_FD:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if line.startswith(b"L"):  # a log event (the worker's --log-to-supervisor)
                self.supervisor.worker_logged(line[1:])
                continue
            try:
                state = json.loads(line)
            except ValueError:
                continue
            if isinstance(state, dict):
                self.supervisor.worker_said(self, state)
        if len(self._buffer) > MAX_STATUS_LINE:  # not a line: drop it, keep the pipe
            self._buffer = b""

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)


class Supervisor(service.MultiService):
    """Starts, watches and stops ``config.service.workers`` worker processes."""

    def __init__(self, config: Config, reactor: Any, notifier: Notifier | None = None,
                 logger: str | None = None, forward_logs: bool = False,
                 python: str = sys.executable) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.notifier = notifier or Notifier({})
        self.logger = logger  # twistd --logger, passed on to the workers
        self.forward_logs = forward_logs  # twistd logs to a file or syslog: workers log here
        self.python = python
        self.count = config.service.workers
        self.state_dir = config.gateway.state_dir
        self.spool_root = self.state_dir / "spool"
        self.stopping = False
        self.restarts = 0
        self.workers: dict[int, WorkerProcess | None] = dict.fromkeys(range(self.count))
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="supervisor")
        self.node_metrics = NodeMetrics(self)
        # Per listener, the listening socket of each worker (a file descriptor), and what
        # to close at stop (Twisted ports, or sockets).
        self._fds: list[tuple[str, list[int]]] = []
        self._listening: list[Any] = []
        self._delay = dict.fromkeys(range(self.count), 0.0)
        self._respawns: dict[int, Any] = {}
        self._announced = False
        self._reloading: set[int] = set()
        self._all_ended: list[defer.Deferred[None]] = []
        self._watchdog: LoopingCall | None = None
        ControlService(FanoutControl(self.state_dir, self.count, reactor, self.pool),
                       self.state_dir / CONTROL_SOCKET, reactor).setServiceParent(self)
        self.web: OperationsWebService | None = None
        if config.metrics.endpoint is not None:
            self.web = OperationsWebService(self, config.metrics.endpoint, site)

    # --- start ------------------------------------------------------------------------
    def startService(self) -> None:
        log.info("supervisor: {n} workers", n=self.count)
        for line in describe(self.config):
            log.info("{line}", line=line)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        Spool(self.spool_root, self.reactor, self.pool).open()
        (self.state_dir / WORKER_SOCKETS).mkdir(mode=0o700, exist_ok=True)
        for listener in self.config.listeners:
            # A self-signed pair is made once, here; a configured pair that does not load
            # stops the start now, not in a loop of worker restarts.
            cert, key = certificate_for(listener, self.config)
            CertificateSource(cert, key, listener.tls_min_version).build()
        self.pool.start()
        try:
            for listener in self.config.listeners:
                self._fds.append((listener.name, self._open(listener.name, listener.endpoint)))
            super().startService()
            if self.web is not None:
                self.web.startService()
        except BaseException:  # twistd exits with the error, not hanging on the pool
            for item in self._listening:
                if isinstance(item, socket.socket):
                    item.close()
                else:
                    item.stopListening()
            self._listening = []
            if self.running:
                super().stopService()
            self.pool.stop()
            raise
        for index in range(self.count):
            self._spawn(index)
        interval = self.notifier.watchdog_interval
        if interval is not None and self.notifier.enabled:
            self._watchdog = LoopingCall(self._watch, interval)
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval / 2, now=False)

    def _open(self, name: str, endpoint: str) -> list[int]:
        """The listening socket of each worker for one listener.

        TCP: one socket per worker, all bound to the same address with SO_REUSEPORT, so
        the kernel spreads new connections evenly over the workers (by a hash of the
        client's address and port).  A worker that is restarting leaves its socket to the
        supervisor, whose copy keeps its queue of connections until the new worker accepts.
        Other endpoints (unix, systemd's sockets): one socket that every worker accepts
        on, each taking one connection per wake-up (gateway.service._adopt)."""
        tcp = tcp_listen_parameters(endpoint)
        if tcp is not None:
            return self._reuseport(name, *tcp)
        result: list[Any] = []
        serverFromString(self.reactor, endpoint).listen(Factory()).addBoth(result.append)
        if not result:
            raise RuntimeError(f"listener {name}: {endpoint} did not start")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        port = result[0]
        port.stopReading()
        self._listening.append(port)
        log.info("listening on {address} ({name}) for {n} workers", address=port.getHost(),
                 name=name, n=self.count)
        return [port.fileno()] * self.count

    def _reuseport(self, name: str, kind: str, interface: str, port: int,
                   backlog: int) -> list[int]:
        family = (socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET)
        host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        fds = []
        for _ in range(self.count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            self._listening.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                raise CannotListenError(host, port, e) from None
            port = sock.getsockname()[1]  # port 0: the others join the one the first got
            sock.listen(backlog)
            fds.append(sock.fileno())
        address = (IPv6Address if family == socket.AF_INET6 else IPv4Address)("TCP", host, port)
        log.info("listening on {address} ({name}) for {n} workers", address=address,
                 name=name, n=self.count)
        return fds

    def _spawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        if self.stopping:
            return
        args = [self.python, "-m", "gateway.worker", "--index", str(index),
                "--count", str(self.count), "--status-fd", str(STATUS_FD)]
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, STATUS_FD: "r"}
        for offset, (name, fds) in enumerate(self._fds):
            child_fds[FIRST_LISTEN_FD + offset] = fds[index]
            args += ["--listen", f"{name}={FIRST_LISTEN_FD + offset}"]
        if self.config.source is not None:
            args += ["--config", str(self.config.source)]
        if self.forward_logs:
            args += ["--log-to-supervisor"]
        elif self.logger:
            args += ["--logger", self.logger]
        if self.notifier.watchdog_interval is not None and self.notifier.enabled:
            args += ["--watchdog", str(self.notifier.watchdog_interval)]
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
        worker = WorkerProcess(self, index, self.reactor.seconds())
        process = self.reactor.spawnProcess(worker, self.python, args, env=env,
                                            childFDs=child_fds)
        worker.pid = process.pid
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    # --- what workers say -------------------------------------------------------------
    def running_count(self) -> int:
        return sum(1 for w in self.workers.values() if w is not None)

    def status_text(self) -> str:
        ready = sum(1 for w in self.workers.values() if w is not None and w.ready)
        return (f"{ready} of {self.count} workers ready; "
                f"accepting on {len(self._fds)} listeners")

    def worker_said(self, worker: WorkerProcess, state: dict[str, Any]) -> None:
        if self.workers.get(worker.index) is not worker:
            return
        worker.last_ping = self.reactor.seconds()
        if "READY" in state:
            worker.ready = True
            self._reloading.discard(worker.index)
            if not self._announced and all(w is not None and w.ready
                                           for w in self.workers.values()):
                self._announced = True
                log.info("all {n} workers ready", n=self.count)
                self.notifier.ready(self.status_text())
            elif self._announced and not self._reloading:
                self.notifier.ready(self.status_text())

    def worker_logged(self, text: bytes) -> None:
        try:
            event = eventFromJSON(text.decode("utf-8", "replace"))
        except ValueError:
            return
        globalLogPublisher(event)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            self.workers[worker.index] = None
        self._reloading.discard(worker.index)
        if self.stopping:
            log.info("worker {index} stopped ({how})", index=worker.index,
                     how=_how(reason))
            if self.running_count() == 0:
                waiting, self._all_ended = self._all_ended, []
                for d in waiting:
                    if not d.called:  # not timed out meanwhile
                        d.callback(None)
            return
        ran = self.reactor.seconds() - worker.started
        delay = (RESTART_MIN if ran >= STABLE_AFTER
                 else min(RESTART_MAX, max(RESTART_MIN, self._delay[worker.index] * 2)))
        self._delay[worker.index] = delay
        self.restarts += 1
        log.error("worker {index} (pid {pid}) ended after {ran:.1f}s ({how}); restarting it"
                  " in {delay:g}s, and it takes back its queued mail", index=worker.index,
                  pid=worker.pid, ran=ran, how=_how(reason), delay=delay,
                  event="worker_restart")
        self.notifier.status(self.status_text())
        self._respawns[worker.index] = self.reactor.callLater(delay, self._spawn,
                                                              worker.index)

    def _watch(self, interval: float) -> None:
        """systemd's watchdog, passed on: a worker that has not pinged for a whole interval
        is hung; kill it (it restarts).  The supervisor itself pings while it turns."""
        now = self.reactor.seconds()
        for worker in self.workers.values():
            if worker is not None and now - worker.last_ping > interval:
                log.critical("worker {index} (pid {pid}) silent for {s:.0f}s: killing it",
                             index=worker.index, pid=worker.pid, s=now - worker.last_ping)
                worker.signal("KILL")
        self.notifier.watchdog()

    # --- reload -----------------------------------------------------------------------
    def reload(self) -> bool:
        """Check the file here (a bad one is refused before any worker sees it), then
        SIGHUP every worker; READY=1 once they have all answered."""
        self.notifier.reloading()
        try:
            new = load_again(self.config)
        except (ConfigError, OSError, ValueError) as e:
            log.error("reload refused, the running configuration stays: {error}",
                      error=str(e), event="reload", result="refused")
            self.notifier.ready("running; last reload refused: " + str(e)[:200])
            return False
        if new.service.workers != self.count:
            log.warn("reload: service.workers changed ({old} -> {new}) and needs a restart;"
                     " {old} workers stay", old=self.count, new=new.service.workers,
                     event="reload_restart_needed")
            new = replace(new, service=replace(new.service, workers=self.count))
        self.config = replace(new, listeners=self.config.listeners,
                              gateway=self.config.gateway, metrics=self.config.metrics)
        running = [w for w in self.workers.values() if w is not None]
        self._reloading = {w.index for w in running}
        for worker in running:
            worker.signal("HUP")
        log.info("reload forwarded to {n} workers", n=len(running))
        if not running:
            self.notifier.ready(self.status_text())
        return True

    # --- stop -------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred[None]:
        self.stopping = True
        self.notifier.stopping()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        d = defer.Deferred.fromCoroutine(self._stop())
        d.addErrback(lambda f: log.failure("stopping the workers", f))

        def rest(_: object) -> Any:
            return super(Supervisor, self).stopService()

        def close(result: Any) -> Any:
            self.pool.stop()
            self.notifier.close()
            return result

        return d.addBoth(rest).addBoth(close)

    async def _stop(self) -> None:
        listening, self._listening = self._listening, []
        closing = [defer.maybeDeferred(item.stopListening) for item in listening
                   if not isinstance(item, socket.socket)]
        for item in listening:
            if isinstance(item, socket.socket):
                item.close()  # the supervisor's copy; the workers close theirs
        if self.web is not None:
            closing.append(defer.maybeDeferred(self.web.stopService))
        await defer.gatherResults(closing, consumeErrors=True).addErrback(lambda f: None)
        running = [w for w in self.workers.values() if w is not None]
        for worker in running:
            worker.signal("TERM")
        if not running:
            return
        bound = self.config.service.stop_timeout + KILL_GRACE
        if not await self._ended_within(bound):
            for worker in self.workers.values():
                if worker is not None:
                    log.error("worker {index} (pid {pid}) still running {bound:g}s after"
                              " SIGTERM: killing it", index=worker.index, pid=worker.pid,
                              bound=bound)
                    worker.signal("KILL")
            await self._ended_within(5.0)

    async def _ended_within(self, seconds: float) -> bool:
        if self.running_count() == 0:
            return True
        d: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(d)
        d.addTimeout(seconds, self.reactor)
        try:
            await d
        except defer.TimeoutError:
            return False
        return True


def _how(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exit status 0"
    value = reason.value
    if getattr(value, "signal", None):
        return f"killed by signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', '?')}"
