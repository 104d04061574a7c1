"""SIGKILL a running ``twistd -n itpison-gateway`` under load: every 250 is delivered after restart."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from twistdrig import TwistdProcess, gateway_toml, tls_smarthost


def write_config(tmp_path: Path, smarthost_port: int, ca: Path) -> Path:
    return gateway_toml(tmp_path, smarthost=tls_smarthost(smarthost_port, ca),
                        extra="[queue]\nretry_min = 1\nretry_max = 2\n")


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
    gw = TwistdProcess(config, tmp_path)
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
        second = TwistdProcess(config, tmp_path)
        await threads.deferToThread(second.wait_ready)
        await fs.wait_for_messages(len(accepted), timeout=60)
        await threads.deferToThread(time.sleep, 1.0)  # anything extra would show up now
        delivered = [m.message_id for m in fs.messages]
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
