"""X-Header control end to end: real SMTP in, the FakeSmarthost sink out."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from gatewayrig import start_gateway

OPTIONS = {
    "defaults": {"link_option": ["NotTrackOpen", "NotTrackAllLink"]},
    "force_on": {"link_option": ["NotTrackOpen"]},
    "deny": {"list_option": ["BypassAllListProcessFilter"]},
    "groups": {"bulk": {"allow": {"list_option": ["BypassAllListProcessFilter"]}}},
    "users": {"alice": {"groups": ["bulk"]}},
    "trusted": {"defaults": {"job_name": "internal-apps"}},
    "ref_number_template": "{queue_id}",
}


@pytest_twisted.async_yield_fixture()
async def smarthost(test_ca):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("smarthost", "localhost"))
    await fs.start()
    yield fs
    await fs.stop()


@pytest_twisted.async_yield_fixture()
async def gateway(tmp_path, test_ca, server_cert, smarthost):
    entry = {"host": "127.0.0.1", "port": smarthost.port, "security": "smtps",
             "tls_name": "localhost", "ca_file": str(test_ca.ca_pem)}
    gw = await start_gateway(tmp_path, test_ca, server_cert, [entry],
                             users={"alice": ("pw-a", ["*"]), "bob": ("pw-b", ["*"])},
                             options=OPTIONS)
    yield gw
    await gw.stop()


def msg(*headers: str) -> bytes:
    return ("From: app@corp.example\r\nTo: x@example.net\r\n" + "".join(h + "\r\n" for h in headers)
            + "Subject: hi\r\n\r\nbody\r\n").encode()


def send(gateway, data: bytes, user: str | None = None) -> tuple[int, bytes]:
    with gateway.smtp("submission" if user else "smtp") as c:
        c.ehlo("client.example")
        if user:
            c.starttls(context=gateway.tls_context())
            c.ehlo("client.example")
            c.login(user, {"alice": "pw-a", "bob": "pw-b"}[user])
        c.mail("app@corp.example")
        c.rcpt("x@example.net")
        return c.data(data)


def queued_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250, reply
    return text.decode().rsplit(" ", 1)[1]


def spooled(gateway) -> list[bytes]:
    queue = gateway.service.config.gateway.state_dir / "spool"
    return [p.read_bytes() for p in queue.rglob("*")
            if p.is_file() and p.parent.name != "slots"]  # not the slot locks (ownership)


@pytest_twisted.ensureDeferred
async def test_smarthost_receives_exactly_the_computed_headers(gateway, smarthost):
    data = msg("X-LinkOption: AddQStrToLink", "X-ListOption: 65537", "X-SendOption: 4")
    qid = queued_id(await threads.deferToThread(send, gateway, data, "alice"))
    [got] = await smarthost.wait_for_messages(1, timeout=20)
    _received, _, rest = got.data.partition(b"\r\n\tby gw.example.test")
    headers = rest.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert headers[-7:] == [b"From: app@corp.example", b"To: x@example.net",
                            b"Subject: hi", b"X-RefNumber: " + qid.encode(),
                            b"X-ListOption: 65537", b"X-LinkOption: 66", b"X-SendOption: 4"]
    assert got.data.endswith(b"\r\n\r\nbody\r\n")


@pytest_twisted.ensureDeferred
async def test_trusted_client_gets_its_profile_and_defaults(gateway, smarthost):
    qid = queued_id(await threads.deferToThread(send, gateway, msg()))
    [got] = await smarthost.wait_for_messages(1, timeout=20)
    head = got.data.partition(b"\r\n\r\n")[0]
    assert head.endswith(b"Subject: hi\r\nX-JobName: internal-apps\r\nX-RefNumber: "
                         + qid.encode() + b"\r\nX-LinkOption: 192")


@pytest.mark.parametrize("user,header,reply", [
    ("bob", "X-ListOption: 65536", b"5.7.1 X-ListOption: bits 65536 not permitted"),
    (None, "X-SendOption: 9", b"5.6.0 X-SendOption: SendOption 9 is out of range 0..4"),
    (None, "X-LinkOption: 32768", b"5.6.0 X-LinkOption: unknown bits 32768"),
    ("alice", "X-NextLaunchTime: 2026-12-05 09:00", b"5.6.0 X-NextLaunchTime: time without"),
])
@pytest_twisted.ensureDeferred
async def test_refused_messages_never_reach_the_spool(gateway, smarthost, user, header, reply):
    def attempt():
        try:
            return send(gateway, msg(header), user)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error

    code, text = await threads.deferToThread(attempt)
    assert code == 550 and text.startswith(reply), (code, text)
    assert spooled(gateway) == []
    assert smarthost.messages == []
