"""One worker process: ``python -m gateway.worker``, started by gateway.supervisor.

A worker is a whole GatewayService (gateway.service.WorkerRole) that accepts on the
listening sockets it inherited, delivers the messages of its queue slots, and reports to
its supervisor instead of systemd:

- fd 3 (``--status-fd``): one JSON object a line, the same keys as sd_notify
  (``{"READY": 1, "STATUS": "..."}``, ``{"WATCHDOG": 1}``, ``{"STOPPING": 1}``), and,
  with ``--log-to-supervisor``, log events (``L`` and the event as JSON);
- fd 0: a pipe from the supervisor that is never written; end of file means the
  supervisor is gone, and the worker stops gracefully (as on SIGTERM) instead of
  delivering on without anyone to restart it;
- SIGHUP reloads (the supervisor forwards its own), SIGTERM stops.

Logs go to the inherited stdout, line-buffered so that the workers' lines do not mix,
through the observer the supervisor was started with (``twistd --logger``), or to the
supervisor when it logs to a file (which it rotates) or to syslog; ``worker`` is set on
every event.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.internet import fdesc
from twisted.logger import Logger, eventAsJSON, globalLogBeginner, textFileLogObserver
from twisted.python.reflect import namedAny

from gateway.sdnotify import Notifier

log = Logger(namespace="gateway.worker")


class StatusPipe:
    """Whole lines to the supervisor, from any thread (log events come from the spool and
    auth threads too).  A line starting with ``{`` is a state, with ``L`` a log event."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def write(self, line: bytes) -> bool:
        with self._lock:
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:
                return False  # the supervisor is gone: fd 0 says so too
        return True


class PipeNotifier(Notifier):
    """sd_notify's states as JSON lines on the pipe to the supervisor."""

    def __init__(self, pipe: StatusPipe, watchdog_interval: float | None) -> None:
        super().__init__({})
        self.pipe = pipe
        self.address = f"fd:{pipe.fd}"  # enabled
        self.watchdog_interval = watchdog_interval

    def notify(self, **state: Any) -> bool:
        return self.pipe.write(json.dumps(state, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        pass  # the pipe lives as long as the process


class ParentWatch:
    """Calls ``lost`` when fd 0 (a pipe the supervisor holds open) reaches end of file."""

    def __init__(self, reactor: Any, lost: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.lost = lost
        self.fd = fd
        self._fired = False
        fdesc.setNonBlocking(fd)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self._gone()

    def connectionLost(self, reason: Any) -> None:
        # epoll reports a closed pipe as a hang-up, not as a readable end of file.
        self._gone()

    def _gone(self) -> None:
        if not self._fired:
            self._fired = True
            self.lost()

    def logPrefix(self) -> str:
        return "supervisor-pipe"


def _observer(logger: str | None, index: int, pipe: StatusPipe | None) -> Any:
    """Where this worker's log events go, with ``worker`` on every event (and in the text
    prefix): the supervisor's observer (``twistd --logger``) on the shared stdout, or
    twistd's text format there, or, when the supervisor logs to a file or syslog, the
    supervisor itself (``pipe``), so that one process writes and rotates the log."""
    if pipe is not None:
        def inner(event: dict[str, Any]) -> None:
            pipe.write(b"L" + eventAsJSON(event).encode() + b"\n")
    else:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        inner = namedAny(logger)() if logger else textFileLogObserver(sys.stdout)

    def observe(event: dict[str, Any]) -> None:
        event["worker"] = index
        system = event.get("log_system")
        if system in (None, "-"):
            namespace = event.get("log_namespace", "-")
            level = getattr(event.get("log_level"), "name", "info")
            event["log_system"] = f"worker {index} {namespace}#{level}"
        else:
            event["log_system"] = f"worker {index} {system}"
        inner(event)

    return observe


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway.worker")
    p.add_argument("--config", help="the configuration file (default: the embedded one)")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--listen", action="append", default=[], metavar="NAME=FD",
                   help="an inherited listening socket for the listener NAME")
    p.add_argument("--status-fd", type=int, default=3)
    p.add_argument("--watchdog", type=float, default=None, metavar="SECONDS")
    p.add_argument("--logger", default=None, help="a log observer factory (twistd --logger)")
    p.add_argument("--log-to-supervisor", action="store_true",
                   help="send log events to the supervisor (which logs to a file or syslog)")
    return p.parse_args(argv)


def _fds(pairs: list[str]) -> Mapping[str, int]:
    out = {}
    for pair in pairs:
        name, _, fd = pair.rpartition("=")
        out[name] = int(fd)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    pipe = StatusPipe(args.status_fd)
    globalLogBeginner.beginLoggingTo(
        [_observer(args.logger, args.index, pipe if args.log_to_supervisor else None)],
        redirectStandardIO=False)
    from twisted.internet import reactor

    from gateway.config import ConfigError, default_config, load_config
    from gateway.reload import HangupService
    from gateway.service import GatewayService, WorkerRole

    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        log.critical("worker {index}: {error}", index=args.index, error=str(e))
        return 78  # EX_CONFIG
    if config.service.workers != args.count:  # the file changed since the supervisor read it
        config = replace(config, service=replace(config.service, workers=args.count))
    notifier = PipeNotifier(pipe, args.watchdog)
    gateway = GatewayService(config, reactor, notifier,
                             WorkerRole(args.index, args.count, dict(_fds(args.listen))))
    HangupService(gateway.reload, reactor).setServiceParent(gateway)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            gateway.startService()
        except Exception as e:
            log.failure("worker {index} could not start", index=args.index)
            failed.append(e)
            stop_once()
            return
        reactor.addSystemEventTrigger("before", "shutdown", gateway.stopService)

    def orphaned() -> None:
        log.warn("worker {index}: the supervisor is gone; stopping", index=args.index)
        stop_once()

    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop_once)

    def stop_once() -> None:
        if reactor.running and not stopping:
            stopping.append(True)
            log.info("worker {index}: stopping", index=args.index)
            reactor.stop()

    stopping: list[bool] = []
    ParentWatch(reactor, orphaned)
    reactor.callWhenRunning(start)
    # SIGTERM comes from the supervisor; a terminal's Ctrl-C reaches the whole process
    # group, and the supervisor then stops the workers itself.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor.run(installSignalHandlers=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
