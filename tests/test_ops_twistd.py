"""The operations wiring as systemd runs it: twistd with NOTIFY_SOCKET, SIGHUP, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys

import pytest

from test_twistd import wait_for_line
from twistdrig import SRC, TWISTD, gateway_toml


def datagram(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_twistd_notifies_systemd_survives_sighup_and_logs_json(tmp_path, server_cert):
    conf = gateway_toml(tmp_path, server_cert=server_cert)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": SRC,
           "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logger=gateway.logsetup.json_stdout",
                             "itpison-gateway", "--config", str(conf)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        ready = datagram(notify)
        assert ready["READY"] == "1" and "1 listeners" in ready["STATUS"]
        proc.send_signal(signal.SIGHUP)
        assert datagram(notify)["RELOADING"] == "1"
        assert datagram(notify)["READY"] == "1"
        lines = wait_for_line(proc, '"event": "reload"')
        record = json.loads(lines[-1])
        assert record["result"] == "ok"
        conf.write_text(conf.read_text().replace('port = 9', 'port = 0'))  # invalid
        proc.send_signal(signal.SIGHUP)
        assert datagram(notify)["RELOADING"] == "1"
        assert "refused" in datagram(notify)["STATUS"]
        lines = wait_for_line(proc, '"event": "reload"')
        assert json.loads(lines[-1])["result"] == "refused"
        assert proc.poll() is None  # SIGHUP no longer kills twistd
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert datagram(notify)["STOPPING"] == "1"
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
    notify.close()
    assert os.path.isdir(tmp_path / "state" / "spool" / "queue")


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation_serves_systemds_socket(tmp_path, server_cert, workers):
    """As itpison-gateway.socket runs it: systemd holds the listening socket and passes it
    as fd 3 with LISTEN_FDS=1 and LISTEN_PID; with workers the supervisor shares it."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(50)
    port = listening.getsockname()[1]
    conf = gateway_toml(tmp_path, server_cert=server_cert, endpoint="systemd:domain=INET:index=0",
                        extra=f"[service]\nworkers = {workers}")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": SRC, "LISTEN_FDS": "1",
           "LISTEN_FDNAMES": "smtp"}  # systemd >= 227 always names them; Twisted needs both
    fd = listening.fileno()
    # LISTEN_PID must be twistd's own pid: the wrapper puts the socket on fd 3, sets
    # LISTEN_PID to its own pid, then execs twistd (which keeps the pid).
    launch = (f"import os, sys; os.dup2({fd}, 3); os.close({fd});"
              " os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen(
        [sys.executable, "-c", launch,
         TWISTD, "-n", "--pidfile=", "itpison-gateway", "--config", str(conf)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        pass_fds=(fd,))
    listening.close()  # systemd keeps its copy; here the gateway's is the only one left
    try:
        wait_for_line(proc, "all 2 workers ready" if workers == 2 else "listening on")
        for n in range(6):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("app@corp.example", ["bob@example.net"], f"Subject: {n}\r\n\r\nx\r\n")
        queued = os.listdir(tmp_path / "state" / "spool" / "queue")
        assert len(queued) == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
