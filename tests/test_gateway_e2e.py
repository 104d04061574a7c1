"""The whole gateway over real sockets: clients → listeners → spool → relay → smarthost sink."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from gatewayrig import send_unix, smarthost_entry, start_gateway

ALICE = ("alice-pw-1", ["alice@example.com"])


@pytest_twisted.async_yield_fixture()
async def gateway(tmp_path, test_ca, server_cert, smarthost, relay_password):
    gw = await start_gateway(
        tmp_path, test_ca, server_cert,
        [smarthost_entry(smarthost.port, test_ca.ca_pem, password_file=relay_password)],
        users={"alice": ALICE})
    yield gw
    await gw.stop()


def message(subject: str = "test", body: str = "hello\r\n", sender: str = "alice@example.com") -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\n{body}").encode()


@pytest_twisted.ensureDeferred
async def test_trusted_network_relay_end_to_end(gateway, smarthost):
    def send():
        with gateway.smtp("smtp") as c:
            c.ehlo("printer.corp.example")
            return c.sendmail("scanner@corp.example", ["bob@example.net", "carol@example.org"],
                              message(sender="scanner@corp.example"))

    refused = await threads.deferToThread(send)
    assert refused == {}
    await smarthost.wait_for_messages(1, timeout=20)
    got = smarthost.messages[0]
    assert got.mail_from == "scanner@corp.example"
    assert sorted(got.rcpt_to) == ["bob@example.net", "carol@example.org"]
    assert got.tls and got.auth_user == "relay-account"
    headers, _, body = got.data.partition(b"\r\n\r\n")
    assert headers.startswith(b"Received: from printer.corp.example ([127.0.0.1])\r\n\tby gw.example.test")
    assert b"with ESMTP id " in headers
    assert body == b"hello\r\n"


@pytest_twisted.ensureDeferred
async def test_250_carries_queue_id_and_message_is_on_disk(gateway, smarthost):
    code, text = await threads.deferToThread(gateway.transaction, message())
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    qid = text.split()[-1].decode()
    await smarthost.wait_for_messages(1, timeout=20)
    assert f"id {qid}".encode() in smarthost.messages[0].data


@pytest_twisted.ensureDeferred
async def test_submission_requires_starttls_then_auth(gateway, smarthost):
    def session():
        with gateway.smtp("submission") as c:
            c.ehlo("outlook")
            assert not c.has_extn("auth")  # never offered in cleartext
            assert c.has_extn("starttls")
            assert c.mail("alice@example.com") == (530, b"5.7.0 Must issue a STARTTLS command first")
            c.rset()
            c.starttls(context=gateway.tls_context())
            c.ehlo("outlook")
            assert c.has_extn("auth") and "PLAIN" in c.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
                c.login("alice", "wrong")
            assert bad.value.smtp_code == 535
            c.login("alice", ALICE[0])
            with pytest.raises(smtplib.SMTPSenderRefused) as notmine:
                c.sendmail("mallory@example.com", ["bob@example.net"], message())
            assert notmine.value.smtp_code == 553
            c.rset()
            return c.sendmail("alice@example.com", ["bob@example.net"], message())

    assert await threads.deferToThread(session) == {}
    await smarthost.wait_for_messages(1, timeout=20)
    assert b"with ESMTPSA id" in smarthost.messages[0].data


@pytest_twisted.ensureDeferred
async def test_smtps_implicit_tls(gateway, smarthost):
    def session():
        with gateway.smtp("smtps") as c:
            c.ehlo("client")
            assert not c.has_extn("starttls")  # TLS from the first byte: not offered again
            c.login("alice", ALICE[0])
            return c.sendmail("alice@example.com", ["bob@example.net"], message())

    assert await threads.deferToThread(session) == {}
    await smarthost.wait_for_messages(1, timeout=20)


@pytest_twisted.ensureDeferred
async def test_not_an_open_relay_from_outside_trusted_networks(tmp_path, test_ca, server_cert,
                                                               smarthost, relay_password):
    gw = await start_gateway(
        tmp_path, test_ca, server_cert,
        [smarthost_entry(smarthost.port, test_ca.ca_pem, password_file=relay_password)],
        relay={"trusted_networks": ["192.0.2.0/24"]})
    try:
        def probes():
            results = []
            with gw.smtp("smtp") as c:
                c.ehlo("x")
                results.append(c.mail("a@corp.example")[0])
                for rcpt in ["bob@example.net", "@gw.example.test:bob@example.net",
                             "bob%example.net@gw.example.test"]:
                    results.append(c.docmd(f"RCPT TO:<{rcpt}>")[0])
                results.append(c.docmd("DATA")[0])
            with gw.smtp("smtps") as c:
                c.ehlo("x")
                results.append(c.mail("a@corp.example")[0])
            return results

        assert await threads.deferToThread(probes) == [250, 554, 554, 554, 554, 530]
        assert smarthost.messages == []
        assert list((tmp_path / "state" / "spool" / "queue").iterdir()) == []
    finally:
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_starttls_discards_pipelined_plaintext(gateway):
    def probe():
        c = gateway.raw("smtp")
        c.reply()
        c.command(b"EHLO x\r\n")
        # The injection attempt: commands pipelined behind STARTTLS in the same packet.
        c.send(b"STARTTLS\r\nMAIL FROM:<inj@x.test>\r\nRCPT TO:<v@y.test>\r\n")
        assert c.reply().startswith("220 2.0.0")
        c.buf = b""
        c.starttls(gateway.tls_context())
        after = [c.command(b"RCPT TO:<v@y.test>\r\n"), c.command(b"MAIL FROM:<a@x.test>\r\n")]
        ehlo = c.command(b"EHLO x\r\n")
        c.close()
        return after, ehlo

    (rcpt, mail), ehlo = await threads.deferToThread(probe)
    assert rcpt.startswith("503 5.5.1")  # the injected MAIL never happened
    assert mail.startswith("503 5.5.1 Send HELO/EHLO first")  # and the session was reset
    assert "STARTTLS" not in ehlo


@pytest_twisted.ensureDeferred
async def test_inbound_smuggling_yields_one_message(gateway, smarthost):
    smuggle = (b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@x.test>\nRCPT TO:<victim@y.test>\n"
               b"DATA\nsmuggled\n.\r\r\n.\rsecond try\r\n.\nthird\r\n")

    def send():
        c = gateway.raw("smtp")
        c.reply()
        c.command(b"EHLO x\r\n")
        c.send(b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        replies = [c.reply(), c.reply(), c.reply()]
        c.send(smuggle + b".\r\n")
        replies.append(c.reply())
        replies.append(c.command(b"MAIL FROM:<a@corp.example>\r\n"))
        replies.append(c.command(b"RCPT TO:<b@example.net>\r\n"))
        replies.append(c.command(b"DATA\r\n"))
        replies.append(c.command(b"Subject: marker\r\n\r\nmarker\r\n.\r\n"))
        c.command(b"QUIT\r\n")
        return replies

    replies = await threads.deferToThread(send)
    assert [r[:3] for r in replies] == ["250", "250", "354", "250", "250", "250", "354", "250"]
    await smarthost.wait_for_messages(2, timeout=20)
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in smarthost.messages)
    assert subjects == [b"marker", b"one"]
    first = next(m for m in smarthost.messages if b"Subject: one" in m.data)
    assert first.rcpt_to == ["b@example.net"]
    assert b"\r\n..\r\nMAIL FROM:<evil@x.test>\r\n" in first.raw_data  # stuffed on the way out
    assert all(m.mail_from == "a@corp.example" for m in smarthost.messages)


@pytest_twisted.ensureDeferred
async def test_dot_stuffing_outbound_is_exact(gateway, smarthost):
    lines = [b".first", b"..two", b".", b"x" * 900, b"plain"]
    body = b"\r\n".join(lines) + b"\r\n"
    # Lines starting with "." at 16 KiB boundaries (where twisted.mail's client misses them).
    filler = b""
    while len(filler) < 40000:
        pad = 16384 - (len(filler) % 16384) - 2
        filler += (b"y" * max(pad, 0))[:998] + b"\r\n"
        if len(filler) % 16384 == 0:
            filler += b".boundary\r\n"
    body += filler + b".last\r\n"
    msg = b"Subject: dots\r\n\r\n" + body

    def send():
        with gateway.smtp("smtp") as c:
            return c.sendmail("a@corp.example", ["b@example.net"], msg)

    assert await threads.deferToThread(send) == {}
    await smarthost.wait_for_messages(1, timeout=20)
    assert smarthost.messages[0].data.split(b"\r\n\r\n", 1)[1] == body
    assert len(smarthost.messages) == 1


@pytest_twisted.ensureDeferred
async def test_permanent_failure_bounces_to_sender(tmp_path, test_ca, server_cert, relay_password):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("sh2", "localhost"),
                       users={"relay-account": "relay-secret"},
                       responses={"rcpt": {"nobody@example.net": "550 5.1.1 no such user"}})
    await fs.start()
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(fs.port, test_ca.ca_pem, password_file=relay_password)])
    try:
        def send():
            with gw.smtp("smtp") as c:
                return c.sendmail("app@corp.example", ["bob@example.net", "nobody@example.net"],
                                  message(subject="invoice", sender="app@corp.example"))

        assert await threads.deferToThread(send) == {}
        await fs.wait_for_messages(2, timeout=20)
        delivered, dsn = fs.messages
        assert delivered.rcpt_to == ["bob@example.net"]
        assert dsn.mail_from == "" and dsn.rcpt_to == ["app@corp.example"]
        assert b"multipart/report" in dsn.data and b"report-type=delivery-status" in dsn.data
        assert b"nobody@example.net" in dsn.data and b"5.1.1" in dsn.data
    finally:
        await gw.stop()
        await fs.stop()


@pytest_twisted.ensureDeferred
async def test_smarthost_outage_mail_waits_and_is_retried(tmp_path, test_ca, server_cert,
                                                          relay_password):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("sh3", "localhost"),
                       users={"relay-account": "relay-secret"},
                       responses={"greeting": "421 4.3.2 down for maintenance"})
    await fs.start()
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(fs.port, test_ca.ca_pem, password_file=relay_password)])
    try:
        def send():
            with gw.smtp("smtp") as c:
                return c.sendmail("app@corp.example", ["bob@example.net"], message())

        assert await threads.deferToThread(send) == {}
        await pytest_twisted_sleep(1.5)
        assert fs.messages == []
        queued = list((tmp_path / "state" / "spool" / "queue").iterdir())
        assert len(queued) == 1  # accepted and waiting, not lost
        fs.responses.pop("greeting")
        await fs.wait_for_messages(1, timeout=20)
    finally:
        await gw.stop()
        await fs.stop()


def pytest_twisted_sleep(seconds: float):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_swaks_starttls_auth(gateway, smarthost):
    assert shutil.which("swaks"), "swaks is required (scripts/test.sh installs it)"
    cmd = ["swaks", "--server", f"127.0.0.1:{gateway.ports['submission']}", "--tls",
           "--tls-verify", "--tls-ca-path", str(gateway.ca_file),
           "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", ALICE[0],
           "--from", "alice@example.com", "--to", "bob@example.net",
           "--header", "Subject: from swaks", "--helo", "swaks.client", "--timeout", "20"]
    result = await threads.deferToThread(subprocess.run, cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout and "250 2.0.0 Ok: queued as" in result.stdout
    await smarthost.wait_for_messages(1, timeout=20)
    assert b"Subject: from swaks" in smarthost.messages[0].data


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs for the state directory: a real ENOSPC, not a simulated one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest_twisted.ensureDeferred
async def test_disk_full_gives_452_and_nothing_is_queued(small_disk, tmp_path, test_ca, server_cert,
                                                          smarthost, relay_password):
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(smarthost.port, test_ca.ca_pem,
                                              password_file=relay_password)],
                             gateway={"state_dir": str(small_disk / "state")})
    filler = small_disk / "filler"
    try:
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * (free - 100_000))  # leave ~100 KB
        big = message(body=("y" * 70 + "\r\n") * 4000)  # ~290 KB

        code, text = await threads.deferToThread(gw.transaction, big)
        assert (code, text[:5]) == (452, b"4.3.1")
        queue = small_disk / "state" / "spool" / "queue"
        assert list(queue.iterdir()) == [] and list((queue.parent / "tmp").iterdir()) == []
        filler.unlink()
        code, _ = await threads.deferToThread(gw.transaction, big)
        assert code == 250
        await smarthost.wait_for_messages(1, timeout=20)
    finally:
        await gw.stop()


@pytest_twisted.ensureDeferred
async def test_unwritable_spool_gives_452(gateway, tmp_path, smarthost):
    tmpdir = tmp_path / "state" / "spool" / "tmp"
    tmpdir.rmdir()
    tmpdir.write_bytes(b"")  # the spool cannot create files any more (even as root)

    code, text = await threads.deferToThread(gateway.transaction, message())
    assert (code, text[:5]) == (452, b"4.3.1")
    assert list((tmp_path / "state" / "spool" / "queue").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_listener_serves_local_clients(tmp_path, test_ca, server_cert,
                                                          smarthost, relay_password):
    path = tmp_path / "smtp.sock"
    gw = await start_gateway(
        tmp_path, test_ca, server_cert,
        [smarthost_entry(smarthost.port, test_ca.ca_pem, password_file=relay_password)],
        listeners=[{"mode": "smtp", "endpoint": f"unix:{path}"}])
    try:
        mid = await threads.deferToThread(send_unix, path, 1)
        [received] = await smarthost.wait_for_messages(1)
        assert mid.encode() in received.data
        # A local client: 127.0.0.1 for trusted networks (it relayed without AUTH) and logs.
        assert b"from app.corp.example (127.0.0.1)" in received.data.replace(b"[", b"").replace(
            b"]", b"")
    finally:
        await gw.stop()
