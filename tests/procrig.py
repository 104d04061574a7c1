"""What the real-server test rigs (redis-server, slapd) share: a free loopback port, and a
child process that can be frozen (SIGSTOP), thawed and ended."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    """A port nothing listens on right now (for a child server, or a dead address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as ``self.proc`` by a subclass's ``start``."""

    proc: subprocess.Popen | None = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def end(self, graceful: bool) -> None:
        """Stop the server (thawed first, so a frozen one can die): SIGTERM and wait when
        ``graceful``, else SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            if graceful:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            else:
                self.proc.kill()
            self.proc.wait(10)
        self.proc = None
