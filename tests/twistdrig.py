"""``twistd -n itpison-gateway`` as a real process, for the tests that need one: its
configuration file, and the process with what it logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).parent.parent / "src")
TWISTD = str(Path(sys.executable).with_name("twistd"))
UNREACHABLE = 'host = "127.0.0.1"\nport = 9\nsecurity = "none"'  # mail stays queued
PORT_RE = re.compile(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)")
METRICS_RE = re.compile(r"metrics and health checks on IPv4Address\(.*port=(\d+)\)")
STARTED_RE = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def tls_smarthost(port: int, ca: Path) -> str:
    """The body of a [[smarthosts]] table for a TLS FakeSmarthost with a test-CA
    certificate for "localhost"."""
    return (f'host = "127.0.0.1"\nport = {port}\nsecurity = "smtps"\ntls_name = "localhost"\n'
            f'ca_file = "{ca}"')


def gateway_toml(tmp_path: Path, *, server_cert: Any = None, smarthost: str = UNREACHABLE,
                 endpoint: str = "tcp:0:interface=127.0.0.1", extra: str = "") -> Path:
    """``tmp_path/gw.toml``: state in ``tmp_path/state``, one smtp listener on
    ``endpoint``, one smarthost (the body of its table), then ``extra`` sections."""
    tls = (f'[tls]\ncertificate = "{server_cert.cert}"\nprivate_key = "{server_cert.key}"\n'
           if server_cert is not None else "")
    conf = tmp_path / "gw.toml"
    conf.write_text(f"""
[gateway]
hostname = "gw.example.test"
state_dir = "{tmp_path / 'state'}"
{tls}
[[listeners]]
endpoint = "{endpoint}"
mode = "smtp"

[[smarthosts]]
{smarthost}

{extra}
""")
    return conf


class TwistdProcess:
    """The gateway started on ``config``; every line it logs is kept in ``lines``, and
    the first smtp port, the metrics port and each worker's pids are read from them."""

    def __init__(self, config: Path, cwd: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args, "itpison-gateway", "--config", str(config)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": SRC, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.pids: dict[int, list[int]] = defaultdict(list)  # every pid of each worker index
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                if self.port is None and (m := PORT_RE.search(line)):
                    self.port = int(m.group(1))
                if m := METRICS_RE.search(line):
                    self.metrics_port = int(m.group(1))
                if m := STARTED_RE.search(line):
                    self.pids[int(m.group(1))].append(int(m.group(2)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(needle in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{needle!r} x{count} not seen:\n"
                                         + "".join(self.lines[-40:]))
                self._changed.wait(min(left, 0.5))

    def wait_ready(self, timeout: float = 60) -> int:
        """The smtp port, once the gateway listens."""
        self.wait_for("listening on IPv4Address", timeout=timeout)
        assert self.port is not None, "".join(self.lines[-40:])
        return self.port

    def count(self, pattern: str) -> int:
        with self._changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and the exit status (twistd re-raises SIGTERM: -15 is a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode
