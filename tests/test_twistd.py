"""The twistd plugin as a user runs it: embedded default, --config, and a bad config."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twistdrig import TWISTD, gateway_toml


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 30) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n" + "".join(lines[-30:]))


def test_embedded_default_starts_and_queues_mail_without_network(tmp_path):
    """No --config: listeners on 127.0.0.1:2525/2587/2465, self-signed cert, spool in ./var.

    The smarthosts (smtp.itpison.com) are unreachable here, so mail must wait in the queue.
    """
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "itpison-gateway"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_line(proc, "port=2465")
        assert (tmp_path / "var" / "tls" / "cert.pem").exists()
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as c:
            ehlo = c.ehlo("t")[1].decode()
            assert "STARTTLS" in ehlo and "AUTH" not in ehlo
            assert c.sendmail("app@corp.example", ["bob@example.net"], "Subject: t\r\n\r\nx\r\n") == {}
        with smtplib.SMTP_SSL("127.0.0.1", 2465, timeout=10,
                              context=__import__("ssl")._create_unverified_context()) as c:
            assert "STARTTLS" not in c.ehlo("t")[1].decode()
        with smtplib.SMTP("127.0.0.1", 2587, timeout=10) as c:
            c.ehlo("t")
            assert c.mail("app@corp.example")[0] == 530  # submission: STARTTLS first
        queued = list((tmp_path / "var" / "spool" / "queue").iterdir())
        assert len(queued) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
    # Still queued after a clean stop (no smarthost reachable), never dropped.
    assert len(list((tmp_path / "var" / "spool" / "queue").iterdir())) == 1


@pytest.mark.parametrize("toml,expected", [
    ('[[listeners]]\nendpoint = "tcp:0"\nmode = "smpt"\n[[smarthosts]]\nhost = "a.test"\n',
     "listeners[0].mode: must be one of smtp, submission, smtps"),
    ('[[listeners]]\nendpoint = "tcp:0"\nmode = "smtp"\n[[smarthosts]]\nhost = "a.test"\n'
     '[[smarthosts]]\nhost = "b.test"\nport = 70000\n',
     "smarthosts[1].port: must be 1..65535"),
])
def test_bad_config_exits_non_zero_before_listening(tmp_path, toml, expected):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "itpison-gateway", "--config", str(config)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "listening on" not in result.stdout + result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_stops_the_start_with_an_error(tmp_path, workers):
    """Not a process left hanging on its thread pools: systemd sees the failure at once."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = gateway_toml(tmp_path, endpoint=f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1",
                              extra=f"[service]\nworkers = {workers}")
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "itpison-gateway", "--config",
                                 str(config)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_console_script_check_config(tmp_path):
    script = Path(sys.executable).with_name("itpison-gateway")
    config = tmp_path / "ok.toml"
    config.write_text('[gateway]\nstate_dir = "state"\n[[listeners]]\nendpoint = "tcp:0"\n'
                      'mode = "smtp"\n[[smarthosts]]\nhost = "smtp.itpison.com"\n')
    result = subprocess.run([str(script), "check-config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stdout
