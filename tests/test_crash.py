"""SIGKILL a running ``twistd -n itpison-gateway`` under load: every 250 is delivered after restart."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost


class Twistd:
    """A gateway process; ``port`` is read from its own "listening on" log line."""

    def __init__(self, config: Path, cwd: Path) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        self.proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "itpison-gateway", "--config", str(config)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30) -> int:
        self._ready.wait(timeout)
        assert self.port is not None, "gateway did not start:\n" + "".join(self.lines[-40:])
        return self.port

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode


def write_config(tmp_path: Path, smarthost_port: int, ca: Path) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[gateway]
hostname = "gw.example.test"
state_dir = "{tmp_path / 'state'}"

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
mode = "smtp"

[[smarthosts]]
host = "127.0.0.1"
port = {smarthost_port}
security = "smtps"
tls_name = "localhost"
ca_file = "{ca}"

[queue]
retry_min = 1
retry_max = 2
""")
    return config


BODY = ("x" * 98 + "\r\n") * 50  # 5 KB


def send_until_killed(port: int, accepted: list[str], stop: threading.Event) -> None:
    """Send messages one after another, recording each Message-ID that got a 250."""
    n = 0
    while not stop.is_set():
        n += 1
        mid = f"<crash-{n}@corp.example>"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.sendmail("app@corp.example", ["bob@example.net"],
                           f"Message-ID: {mid}\r\nSubject: {n}\r\n\r\n{BODY}")
        except (OSError, smtplib.SMTPException):
            return
        accepted.append(mid)


@pytest_twisted.ensureDeferred
async def test_sigkill_under_load_loses_no_accepted_message(tmp_path, test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("crash-sh", "localhost"),
                       responses={"greeting": "421 4.3.2 down"})  # nothing leaves before the kill
    await fs.start()
    config = write_config(tmp_path, fs.port, test_ca.ca_pem)
    gw = Twistd(config, tmp_path)
    second = None
    try:
        port = await threads.deferToThread(gw.wait_ready)
        accepted: list[str] = []
        stop = threading.Event()
        sender = threading.Thread(target=send_until_killed, args=(port, accepted, stop))
        sender.start()

        def kill_after_some() -> None:
            deadline = time.monotonic() + 60
            while len(accepted) < 25 and time.monotonic() < deadline:
                time.sleep(0.01)
            gw.kill()  # mid-stream: a session is almost certainly in DATA or in the spool
            stop.set()
            sender.join(20)

        await threads.deferToThread(kill_after_some)
        assert len(accepted) >= 25
        assert fs.messages == []

        fs.responses.pop("greeting")
        second = Twistd(config, tmp_path)
        await threads.deferToThread(second.wait_ready)
        await fs.wait_for_messages(len(accepted), timeout=60)
        await threads.deferToThread(time.sleep, 1.0)  # anything extra would show up now
        delivered = [m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
                     for m in fs.messages]
        assert sorted(set(delivered) & set(accepted)) == sorted(accepted)  # none lost
        assert len(delivered) == len(set(delivered))  # none twice
        # Whatever was cut off mid-write was either delivered whole or never accepted.
        assert all(m.data.endswith(BODY.encode()) for m in fs.messages)
        assert not os.listdir(tmp_path / "state" / "spool" / "corrupt")
    finally:
        if second is not None:
            # twistd re-raises the signal after a clean shutdown: -SIGTERM is a clean exit.
            code = await threads.deferToThread(second.stop)  # the sink must keep answering QUIT
            assert code in (0, -signal.SIGTERM), "".join(second.lines[-30:])
        if gw.proc.poll() is None:
            gw.kill()
        await fs.stop()
