"""systemd's readiness protocol (sd_notify(3)) without a dependency.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; each state change is one datagram of ``KEY=VALUE`` lines.  When
``WatchdogSec=`` is set it also passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``), and the
service must send ``WATCHDOG=1`` more often than that; we send it at half the interval.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the gateway runs the same
under ``twistd -n`` in a terminal.  A failed send is logged once and never stops the service.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="gateway.systemd")


class Notifier:
    """Sends state lines to ``NOTIFY_SOCKET``; ``enabled`` is False outside systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        self.watchdog_interval = _watchdog_seconds(environ)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **state: Any) -> bool:
        """``notify(READY=1, STATUS="...")``; True when the datagram was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in state.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd at {address}: {error}",
                         address=self.address.replace("\0", "@"), error=str(e))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match this RELOADING=1 to the reload request.
        return self.notify(RELOADING=1, STATUS="reloading the configuration",
                           MONOTONIC_USEC=int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6))

    def stopping(self) -> bool:
        return self.notify(STOPPING=1, STATUS="stopping: finishing sessions in progress")

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """``WATCHDOG_USEC`` as seconds, when it is meant for this process."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class WatchdogService(service.Service):
    """Pings the systemd watchdog at half its interval while the reactor turns, so a hung
    reactor (the thing the watchdog is for) stops the pings and systemd restarts us."""

    def __init__(self, notifier: Notifier, clock: Any) -> None:
        self.notifier = notifier
        self.clock = clock
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        interval = self.notifier.watchdog_interval
        if interval is None or not self.notifier.enabled:
            return
        self._loop = LoopingCall(self.notifier.watchdog)
        self._loop.clock = self.clock
        self._loop.start(interval / 2, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
