"""Run a whole gateway (GatewayService) in the test reactor, against a FakeSmarthost.

Real listeners on 127.0.0.1 port 0, real TLS from the test CA, and blocking clients
(smtplib, raw sockets, swaks) run in threads so the reactor keeps serving.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads

from gateway.auth_file import set_user
from gateway.config import parse_config
from gateway.service import GatewayService


@dataclass
class Gateway:
    service: GatewayService
    ports: dict[str, int]  # listener name ("smtp", "submission", "smtps") -> port
    ca_file: Path

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def smtp(self, mode: str = "smtp", source: str | None = None) -> smtplib.SMTP:
        """A connected smtplib client (blocking: call it inside a thread); ``source`` is
        another loopback address to connect from (127.0.0.2, ...)."""
        address = (source, 0) if source else None
        if mode == "smtps":
            return smtplib.SMTP_SSL("127.0.0.1", self.ports[mode], context=self.tls_context(),
                                    timeout=20, source_address=address)
        return smtplib.SMTP("127.0.0.1", self.ports[mode], timeout=20, source_address=address)

    def transaction(self, message: bytes, sender: str = "a@corp.example",
                    recipient: str = "b@example.net") -> tuple[int, bytes]:
        """One trusted-network transaction on the smtp listener: the reply to the end of
        DATA, as (code, text) (blocking: call it inside a thread)."""
        with self.smtp("smtp") as c:
            c.ehlo("x")
            c.mail(sender)
            c.rcpt(recipient)
            return c.data(message)

    def raw(self, mode: str = "smtp") -> RawClient:
        return RawClient(socket.create_connection(("127.0.0.1", self.ports[mode]), timeout=20))

    async def stop(self) -> None:
        await self.service.stopService()


class RawClient:
    """A line-level client for probes smtplib won't send (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, as its lines joined by newlines."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r} / {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, data: bytes) -> str:
        self.send(data)
        return self.reply()

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buf, f"plaintext left after STARTTLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


def smarthost_entry(port: int, ca_file: Path, *, security: str = "smtps",
                    password_file: Path | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": security}
    if security != "none":
        entry.update(tls_name="localhost", ca_file=str(ca_file))
    if password_file is not None:
        entry.update(username="relay-account", password_file=str(password_file))
    return entry


async def start_gateway(tmp_path: Path, test_ca: Any, server_cert: Any, smarthosts: list[dict],
                        *, users: dict[str, tuple[str, list[str]]] | None = None,
                        listeners: list[dict[str, Any]] | None = None,
                        **sections: dict[str, Any]) -> Gateway:
    """A GatewayService with smtp, submission and smtps listeners on free ports (or the
    given ``listeners``, each on port 0 of 127.0.0.1)."""
    state = tmp_path / "state"
    data: dict[str, Any] = {
        "gateway": {"hostname": "gw.example.test", "state_dir": str(state)},
        "tls": {"certificate": str(server_cert.cert), "private_key": str(server_cert.key)},
        "listeners": [{"endpoint": "tcp:0:interface=127.0.0.1", **item} for item in
                      listeners or [{"mode": m} for m in ("smtp", "submission", "smtps")]],
        "smarthosts": smarthosts,
        "queue": {"retry_min": 1, "retry_max": 2},
    }
    if users:
        users_file = tmp_path / "users.toml"
        for name, (password, senders) in users.items():
            await threads.deferToThread(set_user, users_file, name, password, senders)
        data["auth"] = {"users_file": str(users_file)}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config = parse_config(data, base_dir=tmp_path)
    service = GatewayService(config, reactor)
    service.startService()
    ports = {lst.name: getattr(port.getHost(), "port", None)  # None: a unix socket
             for lst, port in zip(config.listeners, service.ports, strict=True)}
    return Gateway(service, ports, test_ca.ca_pem)


def send_unix(path: Path, n: int) -> str:
    """One message over a unix-socket listener (shared by the workers), by hand."""
    mid = f"<u-{n}@corp.example>"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rb")

        def expect(code: bytes) -> None:
            while True:
                line = f.readline()
                assert line.startswith(code), line
                if line[3:4] == b" ":
                    return

        expect(b"220")
        for command, code in ((b"EHLO app.corp.example", b"250"),
                              (b"MAIL FROM:<app@corp.example>", b"250"),
                              (b"RCPT TO:<bob@example.net>", b"250"), (b"DATA", b"354")):
            s.sendall(command + b"\r\n")
            expect(code)
        s.sendall(f"Message-ID: {mid}\r\n\r\nbody\r\n.\r\nQUIT\r\n".encode())
        expect(b"250")
        expect(b"221")
    return mid
