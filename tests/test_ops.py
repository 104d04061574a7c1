"""Operations: sd_notify, reload (certificates, invalid files), graceful stop, metrics and
health, PROXY protocol, certificate polling, the systemd unit.  Real sockets on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task, threads

from fakesmarthost import FakeSmarthost
from gateway.certs import CertificateSource, SwappableServerTLS
from gateway.config import load_config
from gateway.sdnotify import Notifier, WatchdogService
from gatewayrig import RawClient, smarthost_entry, start_gateway

MSG = b"From: a@corp.example\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhello\r\n"


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.01)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    while True:
        try:
            data = sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return out
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@pytest_twisted.async_yield_fixture()
async def smarthost(test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("smarthost", "localhost"))
    await fs.start()
    yield fs
    await fs.stop()


def peer_cert(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return s.getpeercert(binary_form=True)


def write_config(path: Path, tmp_path: Path, cert, smarthost_port: int, ca: Path,
                 extra: str = "") -> None:
    path.write_text(f"""
[gateway]
hostname = "gw.example.test"
state_dir = "{tmp_path / 'state'}"
[tls]
certificate = "{cert.cert}"
private_key = "{cert.key}"
[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
mode = "smtp"
[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
mode = "smtps"
[[smarthosts]]
host = "127.0.0.1"
port = {smarthost_port}
security = "smtps"
tls_name = "localhost"
ca_file = "{ca}"
[queue]
retry_min = 1
retry_max = 2
{extra}
""")


# --- sd_notify --------------------------------------------------------------------------

def test_notifier_sends_datagrams_and_is_silent_outside_systemd(notify_socket):
    path, sock = notify_socket
    assert Notifier({}).ready("x") is False
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert n.ready("up") and n.reloading() and n.stopping()
    got = received(sock)
    assert got[0] == {"READY": "1", "STATUS": "up"}
    assert got[1]["RELOADING"] == "1" and int(got[1]["MONOTONIC_USEC"]) > 0
    assert got[2]["STOPPING"] == "1"
    n.close()


def test_watchdog_pings_at_half_the_interval(notify_socket):
    path, sock = notify_socket
    clock = task.Clock()
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval == 4.0
    wd = WatchdogService(n, clock)
    wd.startService()
    clock.advance(2.0)
    clock.advance(2.0)
    wd.stopService()
    clock.advance(10.0)
    assert received(sock) == [{"WATCHDOG": "1"}] * 3  # now, +2 s, +4 s; none after stop
    other = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000",
                      "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process


@pytest_twisted.ensureDeferred
async def test_gateway_notifies_ready_reloading_stopping(tmp_path, test_ca, server_cert,
                                                         smarthost, notify_socket):
    path, sock = notify_socket
    conf = tmp_path / "gw.toml"
    write_config(conf, tmp_path, server_cert, smarthost.port, test_ca.ca_pem)
    from gateway.service import GatewayService
    gw = GatewayService(load_config(conf), reactor, Notifier({"NOTIFY_SOCKET": str(path)}))
    gw.startService()
    try:
        ready = received(sock)
        assert ready[-1]["READY"] == "1" and "2 listeners" in ready[-1]["STATUS"]
        assert gw.reload() is True
        states = received(sock)
        assert [("RELOADING" in s, "READY" in s) for s in states] == [(True, False),
                                                                      (False, True)]
    finally:
        await gw.stopService()
    assert received(sock)[0]["STOPPING"] == "1"


# --- reload -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_new_certificate_for_next_client_while_old_session_continues(
        tmp_path, test_ca, server_cert, smarthost):
    conf = tmp_path / "gw.toml"
    write_config(conf, tmp_path, server_cert, smarthost.port, test_ca.ca_pem)
    from gateway.service import GatewayService
    gw = GatewayService(load_config(conf), reactor)
    gw.startService()
    try:
        smtp_port, smtps_port = (p.getHost().port for p in gw.ports)
        before = await threads.deferToThread(peer_cert, smtps_port, test_ca.ca_pem)
        # A session encrypted with the old certificate, mid-transaction.
        old = RawClient(socket.create_connection(("127.0.0.1", smtp_port), timeout=20))

        def begin():
            old.reply()
            old.command(b"EHLO old\r\n")
            assert old.command(b"STARTTLS\r\n").startswith("220")
            old.starttls(ssl.create_default_context(cafile=str(test_ca.ca_pem)))
            old.command(b"EHLO old\r\n")
            return old.command(b"MAIL FROM:<a@corp.example>\r\n")

        assert (await threads.deferToThread(begin)).startswith("250")
        renewed = test_ca.issue("renewed", "localhost", "127.0.0.1")
        write_config(conf, tmp_path, renewed, smarthost.port, test_ca.ca_pem)
        assert gw.reload() is True
        after = await threads.deferToThread(peer_cert, smtps_port, test_ca.ca_pem)
        assert after != before and after == ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())

        def finish():
            old.command(b"RCPT TO:<b@example.net>\r\n")
            old.command(b"DATA\r\n")
            return old.command(MSG + b".\r\n")

        assert (await threads.deferToThread(finish)).startswith("250 2.0.0")
        await smarthost.wait_for_messages(1, timeout=20)
        old.close()
    finally:
        await gw.stopService()


@pytest_twisted.ensureDeferred
async def test_invalid_reload_keeps_the_running_config(tmp_path, test_ca, server_cert,
                                                       smarthost):
    conf = tmp_path / "gw.toml"
    write_config(conf, tmp_path, server_cert, smarthost.port, test_ca.ca_pem,
                 "[limits]\nmax_recipients = 5")
    from gateway.service import GatewayService
    gw = GatewayService(load_config(conf), reactor)
    gw.startService()
    try:
        running = gw.config
        conf.write_text(conf.read_text().replace("max_recipients = 5", "max_recipients = -1"))
        assert gw.reload() is False
        other = test_ca.issue("other", "localhost")
        mismatched = tmp_path / "mismatch.pem"
        mismatched.write_bytes(other.cert.read_bytes())  # not the key's certificate
        write_config(conf, tmp_path, type(server_cert)(mismatched, server_cert.key),
                     smarthost.port, test_ca.ca_pem, "[limits]\nmax_recipients = 7")
        assert gw.reload() is False  # the config parses, the certificate pair does not
        assert gw.config is running
        assert gw.contexts[0].settings.limits.max_recipients == 5
        port = gw.ports[1].getHost().port
        got = await threads.deferToThread(peer_cert, port, test_ca.ca_pem)
        assert got == ssl.PEM_cert_to_DER_cert(server_cert.cert.read_text())
        write_config(conf, tmp_path, server_cert, smarthost.port, test_ca.ca_pem,
                     "[limits]\nmax_recipients = 7")
        assert gw.reload() is True
        assert gw.contexts[0].settings.limits.max_recipients == 7
    finally:
        await gw.stopService()


def test_certificate_renewed_on_disk_is_picked_up(tmp_path, test_ca):
    first = test_ca.issue("first", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    creator = SwappableServerTLS(CertificateSource(cert, key))
    original = creator.current
    assert creator.refresh() is False
    second = test_ca.issue("second", "localhost")
    shutil.copy(second.cert, cert)  # half-way through a renewal: key not yet replaced
    assert creator.refresh() is False and creator.current is original
    shutil.copy(second.key, key)
    assert creator.refresh() is True and creator.current is not original


# --- graceful stop --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stop_lets_a_transaction_finish_and_closes_idle_sessions(
        tmp_path, test_ca, server_cert, smarthost):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem)],
                             service={"stop_timeout": 10})
    idle, busy = gw.raw(), gw.raw()

    def begin():
        for c in (idle, busy):
            c.reply()
            c.command(b"EHLO x\r\n")
        busy.command(b"MAIL FROM:<a@corp.example>\r\n")
        busy.command(b"RCPT TO:<b@example.net>\r\n")
        return busy.command(b"DATA\r\n")

    assert (await threads.deferToThread(begin)).startswith("354")
    stopping = gw.service.stopService()
    assert await threads.deferToThread(idle.reply) == \
        "421 4.3.2 Service shutting down, closing connection"
    assert not stopping.called  # waits for the transaction

    def finish():
        busy.send(MSG + b".\r\n")
        return busy.reply(), busy.reply()

    done, bye = await threads.deferToThread(finish)
    assert done.startswith("250 2.0.0") and bye.startswith("421 4.3.2")
    await stopping
    queued = list((tmp_path / "state" / "spool" / "queue").iterdir())
    assert len(queued) + len(smarthost.messages) >= 1  # accepted: on disk or delivered
    for c in (idle, busy):
        c.close()


@pytest_twisted.ensureDeferred
async def test_stop_bound_ends_a_stalled_transaction_with_421(tmp_path, test_ca, server_cert,
                                                              smarthost):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem)],
                             service={"stop_timeout": 0.5})
    c = gw.raw()

    def begin():
        c.reply()
        c.command(b"EHLO x\r\n")
        return c.command(b"MAIL FROM:<a@corp.example>\r\n")

    assert (await threads.deferToThread(begin)).startswith("250")
    await gw.service.stopService()
    assert await threads.deferToThread(c.reply) == \
        "421 4.3.2 Service shutting down, closing connection"
    c.close()


# --- metrics and health ---------------------------------------------------------------------

def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_metrics_move_as_mail_flows_and_health_endpoints(tmp_path, test_ca, server_cert,
                                                              smarthost):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem)],
                             metrics={"endpoint": "tcp:0:interface=127.0.0.1"})
    try:
        port = gw.service.web.port.getHost().port
        assert await threads.deferToThread(scrape, port, "/healthz") == (200, "ok\n")
        assert await threads.deferToThread(scrape, port, "/readyz") == (200, "ready\n")
        _, before = await threads.deferToThread(scrape, port, "/metrics")
        b = samples(before)
        assert b[("itpison_gateway_messages_accepted_total", ())] == 0
        assert b[("itpison_gateway_queue_messages", (("state", "queue"),))] == 0

        def send():
            with gw.smtp("smtp") as c:
                c.sendmail("a@corp.example", ["b@example.net", "c@example.org"], MSG)
                c.docmd("MAIL", "FROM:<a@corp.example> SIZE=999999999999")  # refused

        await threads.deferToThread(send)
        await smarthost.wait_for_messages(1, timeout=20)
        for _ in range(100):  # the delivered event follows the smarthost's 250
            _, after = await threads.deferToThread(scrape, port, "/metrics")
            a = samples(after)
            host = (("smarthost", f"127.0.0.1:{smarthost.port}"),)
            if a.get(("itpison_gateway_deliveries_total",
                      (("outcome", "delivered"),) + host), 0) >= 2:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert a[("itpison_gateway_messages_accepted_total", ())] >= 1
        assert a[("itpison_gateway_received_bytes_total", ())] >= len(MSG)
        assert a[("itpison_gateway_connections_total", (("listener", "smtp"),))] == 1
        assert a[("itpison_gateway_accept_latency_seconds_count", ())] >= 1
        assert a[("itpison_gateway_deliveries_total", (("outcome", "delivered"),) + host)] >= 2
        assert a[("itpison_gateway_delivery_attempts_total",
                  (("outcome", "delivered"),) + host)] >= 2
        assert a[("itpison_gateway_delivery_latency_seconds_count", ())] >= 2
        assert a[("itpison_gateway_smarthost_circuit_state",
                  (("smarthost", host[0][1]), ("state", "closed")))] == 1
        assert any(k[0] == "itpison_gateway_refused_total" and v >= 1 for k, v in a.items())
        assert "password" not in after.lower()
    finally:
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_readyz_fails_when_every_smarthost_circuit_is_open(tmp_path, test_ca,
                                                                 server_cert, smarthost):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem)],
                             metrics={"endpoint": "tcp:0:interface=127.0.0.1"})
    try:
        for breaker in gw.service.relay.breakers:
            for _ in range(breaker.threshold):
                breaker.failure()
        code, text = await threads.deferToThread(scrape, gw.service.web.port.getHost().port,
                                                 "/readyz")
        assert code == 503 and "circuit is open" in text
    finally:
        await gw.stop()


# --- PROXY protocol ---------------------------------------------------------------------------

async def proxy_gateway(tmp_path, test_ca, server_cert, smarthost, proxies):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem)])
    await gw.stop()
    from gateway.config import parse_config
    from gateway.service import GatewayService
    listener = {"endpoint": "tcp:0:interface=127.0.0.1", "mode": "smtp",
                "proxy_protocol_from": proxies}
    data = {"gateway": {"hostname": "gw.example.test", "state_dir": str(tmp_path / "state")},
            "tls": {"certificate": str(server_cert.cert), "private_key": str(server_cert.key)},
            "listeners": [listener],
            "smarthosts": [smarthost_entry(smarthost.port, test_ca.ca_pem)],
            "relay": {"trusted_networks": ["192.0.2.0/24"]}}
    service = GatewayService(parse_config(data, base_dir=tmp_path), reactor)
    service.startService()
    return service, service.ports[0].getHost().port


V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + (12).to_bytes(2, "big")
      + socket.inet_aton("192.0.2.9") + socket.inet_aton("127.0.0.1")
      + (40000).to_bytes(2, "big") + (25).to_bytes(2, "big"))


@pytest.mark.parametrize("header,client", [
    (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n", "192.0.2.7"),
    (V2, "192.0.2.9"),
])
@pytest_twisted.ensureDeferred
async def test_proxy_header_gives_the_client_address(tmp_path, test_ca, server_cert, smarthost,
                                                     header, client):
    service, port = await proxy_gateway(tmp_path, test_ca, server_cert, smarthost,
                                        ["127.0.0.1/32"])
    try:
        def talk():
            c = RawClient(socket.create_connection(("127.0.0.1", port), timeout=20))
            c.send(header[:7])  # split across reads
            c.send(header[7:])
            greeting = c.reply()
            ehlo = c.command(b"EHLO proxied\r\n")
            # 192.0.2.0/24 is trusted: relay without AUTH works only with the real address.
            c.command(b"MAIL FROM:<a@corp.example>\r\n")
            rcpt = c.command(b"RCPT TO:<b@example.net>\r\n")
            c.close()
            return greeting, ehlo, rcpt

        greeting, ehlo, rcpt = await threads.deferToThread(talk)
        assert greeting.startswith("220 ")
        assert f"[{client}]" in ehlo
        assert rcpt.startswith("250")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_proxy_refused_from_untrusted_peer_and_without_header(tmp_path, test_ca,
                                                                    server_cert, smarthost):
    service, port = await proxy_gateway(tmp_path, test_ca, server_cert, smarthost,
                                        ["10.9.9.9/32"])
    try:
        def untrusted():
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
                return s.recv(100)

        assert await threads.deferToThread(untrusted) == b""  # closed, no greeting
    finally:
        await service.stopService()
    service, port = await proxy_gateway(tmp_path, test_ca, server_cert, smarthost,
                                        ["127.0.0.1/32"])
    try:
        def no_header():
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"EHLO sneaky\r\n")
                return s.recv(100)

        assert await threads.deferToThread(no_header) == b""
    finally:
        await service.stopService()


# --- systemd unit ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (scripts/test.sh installs systemd)")
def test_systemd_units_verify_clean(tmp_path):
    units = Path(__file__).parent.parent / "systemd"
    for unit in units.iterdir():
        text = unit.read_text()
        # verify checks that the executables exist: point them at one that does.
        text = text.replace("/opt/itpison-gateway/venv/bin/itpison-gateway", "/bin/true")
        text = text.replace("/opt/itpison-gateway/venv/bin/twistd", "/bin/true")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    service = (units / "itpison-gateway.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "LoadCredential=",
                 "ProtectSystem=strict", "SystemCallFilter=@system-service"):
        assert line in service


# --- SIGHUP and logs ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sighup_calls_reload_and_the_old_handler_comes_back():
    import os
    import signal

    from gateway.reload import HangupService
    calls = []
    previous = signal.getsignal(signal.SIGHUP)
    hup = HangupService(lambda: calls.append("reload"), reactor)
    hup.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if calls:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
    finally:
        hup.stopService()
    assert calls == ["reload"]
    assert signal.getsignal(signal.SIGHUP) == previous


def test_json_log_lines_carry_event_and_queue_id_and_journald_priority():
    import io
    import json

    from twisted.logger import Logger

    from gateway import logsetup
    out, text = io.StringIO(), io.StringIO()
    log = Logger(namespace="gateway.mail", observer=lambda e: (
        logsetup.json_stdout(out)(e), logsetup.journald_text(text)(e)))
    log.info("{queue_id} delivered to=<{recipient}>", event="delivered", queue_id="Q1",
             recipient="b@example.net")
    log.warn("{queue_id} bounced", event="bounced", queue_id="Q2", recipient="c@Example.ORG",
             host="smtp.itpison.com:465", reply="550 5.1.1 no such user")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["event"], r["queue_id"]) for r in records] == [("delivered", "Q1"),
                                                              ("bounced", "Q2")]
    assert (records[1]["recipient_domain"], records[1]["status"], records[1]["bounce_class"],
            records[1]["host"]) == ("example.org", "550 5.1.1", "hard", "smtp.itpison.com:465")
    assert all(isinstance(r["log_time"], float) for r in records)
    assert text.getvalue() == ("<6>[gateway.mail] Q1 delivered to=<b@example.net>\n"
                               "<4>[gateway.mail] Q2 bounced\n")


def test_credentials_directory_in_paths(tmp_path):
    from gateway.config import ConfigError, parse_config
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "smarthost-password").write_text("s3cret\n")
    data = {"listeners": [{"endpoint": "tcp:0", "mode": "smtp"}],
            "smarthosts": [{"host": "smtp.example.test", "username": "u",
                            "password_file": "${CREDENTIALS_DIRECTORY}/smarthost-password"}]}
    config = parse_config(data, base_dir=tmp_path,
                          environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert config.smarthosts[0].password == "s3cret"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY.* is not set"):
        parse_config(data, base_dir=tmp_path, environ={})


@pytest_twisted.ensureDeferred
async def test_reload_swaps_the_smarthost_list_and_mail_still_flows(tmp_path, test_ca,
                                                                   server_cert, smarthost):
    conf = tmp_path / "gw.toml"
    write_config(conf, tmp_path, server_cert, 9, test_ca.ca_pem)  # nothing listens on 9
    from gateway.service import GatewayService
    gw = GatewayService(load_config(conf), reactor)
    gw.startService()
    try:
        old_relay = gw.relay
        write_config(conf, tmp_path, server_cert, smarthost.port, test_ca.ca_pem)
        assert gw.reload() is True
        assert gw.relay is not old_relay and gw.scheduler.relay is gw.relay
        assert [h.port for h in gw.relay.smarthosts] == [smarthost.port]
        port = gw.ports[0].getHost().port

        def send():
            import smtplib
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                return c.sendmail("a@corp.example", ["b@example.net"], MSG)

        assert await threads.deferToThread(send) == {}
        await smarthost.wait_for_messages(1, timeout=20)
    finally:
        await gw.stopService()


# --- the README's two-node example: two gateways behind a PROXY balancer, one Redis --------

@pytest_twisted.ensureDeferred
async def test_two_nodes_behind_a_proxy_share_limits_on_the_real_client_address(
        tmp_path, test_ca, server_cert, smarthost, redis_server):
    from gateway.config import parse_config
    from gateway.service import GatewayService
    nodes = []
    for name in ("node1", "node2"):
        data = {"gateway": {"hostname": f"{name}.example.test",
                            "state_dir": str(tmp_path / name)},
                "tls": {"certificate": str(server_cert.cert),
                        "private_key": str(server_cert.key)},
                "listeners": [{"endpoint": "tcp:0:interface=127.0.0.1", "mode": "smtp",
                               "proxy_protocol_from": ["127.0.0.1/32"]}],
                "smarthosts": [smarthost_entry(smarthost.port, test_ca.ca_pem)],
                "relay": {"trusted_networks": ["198.51.100.0/24"]},
                "ratelimit": {"redis": redis_server.url, "deadline": 0.3,
                              "rules": [{"dimension": "messages", "key": "ip", "limit": 2,
                                         "window": "1h"}]}}
        node = GatewayService(parse_config(data, base_dir=tmp_path), reactor)
        node.startService()
        nodes.append(node)
    try:
        def via_balancer(node, client):
            port = node.ports[0].getHost().port
            c = RawClient(socket.create_connection(("127.0.0.1", port), timeout=20))
            c.send(f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode())
            c.reply()
            c.command(b"EHLO client\r\n")
            mail = c.command(b"MAIL FROM:<a@corp.example>\r\n")
            c.close()
            return mail[:3]

        codes = [await threads.deferToThread(via_balancer, node, "198.51.100.7")
                 for node in (nodes[0], nodes[1], nodes[0])]
        assert codes == ["250", "250", "451"]  # 2 per hour for 198.51.100.7, both nodes
        # Another client behind the same balancer has its own count.
        assert await threads.deferToThread(via_balancer, nodes[1], "198.51.100.8") == "250"
    finally:
        for node in nodes:
            await node.stopService()


def test_auth_metrics_name_the_backend_that_said_yes():
    from prometheus_client import CollectorRegistry

    from gateway.metrics import MailLogMetrics

    registry = CollectorRegistry()
    metrics = MailLogMetrics(registry, "ldap+file")
    metrics({"event": "auth_ok", "mechanism": "PLAIN", "backend": "file"})
    metrics({"event": "auth_failed", "mechanism": "LOGIN", "reason": "bad credentials"})
    metrics({"event": "auth_failed", "mechanism": "PLAIN", "reason": "backend unavailable"})

    def value(backend, mechanism, outcome):
        return registry.get_sample_value("itpison_gateway_auth_total", {
            "backend": backend, "mechanism": mechanism, "outcome": outcome})

    assert value("file", "PLAIN", "ok") == 1
    assert value("ldap+file", "LOGIN", "failed") == 1
    assert value("ldap+file", "PLAIN", "unavailable") == 1
