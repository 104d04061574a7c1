"""Bounces: RFC 3464 fields, parsed back with the email package; canonical, 7bit, short lines."""

from __future__ import annotations

import email
import email.utils
from email.message import Message

import pytest

from gateway.delivery import Outcome, RecipientResult
from gateway.dsn import build_bounce
from gateway.envelope import Envelope

RECEIVED = 1700000000.0
NOW = RECEIVED + 3 * 86400
ORIGINAL = (b"Received: from client.test ([192.0.2.1]) by gw.example.test\r\n"
            b"From: Sender <s@example.test>\r\nTo: a@x.test\r\nSubject: quarterly report\r\n"
            b"Message-ID: <orig@example.test>\r\n\r\nSECRET BODY LINE\r\n")


def env(sender: str = "s@example.test") -> Envelope:
    return Envelope("2QJ8ZN5K1XVMB7RTQ", sender, ("a@x.test", "b@x.test", "c@x.test"), RECEIVED)


def perm(rcpt: str = "a@x.test", code: int = 550, enhanced: str = "5.1.1",
         text: str = "User unknown", host: str = "smtp.itpison.test:465") -> RecipientResult:
    return RecipientResult(rcpt, Outcome.PERMFAIL, code, enhanced, text, host)


def bounce(failed: list[RecipientResult], message: bytes = ORIGINAL, **kw: object) -> bytes:
    return build_bounce(env(), message, failed, reporting_mta="gw.example.test", now=NOW, **kw)


def parse(data: bytes) -> tuple[Message, Message, list[Message], Message]:
    msg = email.message_from_bytes(data)
    human, report, headers = msg.get_payload()
    return msg, human, report.get_payload(), headers


def unfold(value: str) -> str:
    return value.replace("\r\n", "").replace("\n", "")


def assert_canonical(data: bytes) -> None:
    assert data.isascii()
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_permanent_failure_report() -> None:
    data = bounce([perm()])
    assert_canonical(data)
    msg, human, report, headers = parse(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.test>"
    assert msg["To"] == "<s@example.test>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Message-ID"].endswith("@gw.example.test>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode("ascii")
    assert "<a@x.test>" in text
    assert "550 5.1.1 User unknown" in text

    per_message, per_rcpt = report
    assert per_message["Reporting-MTA"] == "dns; gw.example.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == RECEIVED
    assert per_rcpt["Final-Recipient"] == "rfc822; a@x.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; smtp.itpison.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"

    assert headers.get_content_type() == "text/rfc822-headers"
    quoted = headers.get_payload(decode=True)
    assert b"Subject: quarterly report" in quoted
    assert b"Message-ID: <orig@example.test>" in quoted
    assert b"SECRET BODY" not in data


def test_one_group_per_failed_recipient() -> None:
    failed = [perm("a@x.test"), perm("c@x.test", 554, "5.7.1", "Relay denied", host="")]
    _, _, report, _ = parse(bounce(failed))
    assert [r["Final-Recipient"] for r in report[1:]] == ["rfc822; a@x.test", "rfc822; c@x.test"]
    assert report[2]["Status"] == "5.7.1"
    assert report[2]["Remote-MTA"] is None  # no host was reached
    assert "b@x.test" not in "".join(str(r) for r in report)


@pytest.mark.parametrize(("code", "enhanced", "status"), [
    (550, "", "5.0.0"),  # no enhanced code from the smarthost
    (550, "4.2.0", "5.0.0"),  # a class that contradicts the failure
    (550, "5.x.1", "5.0.0"),
    (552, "5.3.4", "5.3.4"),
])
def test_status_comes_from_the_reply_or_is_generic(code: int, enhanced: str, status: str) -> None:
    _, _, report, _ = parse(bounce([perm(code=code, enhanced=enhanced)]))
    assert report[1]["Status"] == status


def test_expired_recipient_is_4_4_7_and_failed() -> None:
    last = RecipientResult("b@x.test", Outcome.TEMPFAIL, 451, "4.3.0", "Try again later",
                           "smtp.itpison.test:465")
    data = bounce([perm(), last], expired=True)
    _, human, report, _ = parse(data)
    assert report[1]["Status"] == "5.1.1"  # a hard failure stays a hard failure
    assert report[2]["Status"] == "4.4.7"
    assert report[2]["Action"] == "failed"
    assert report[2]["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
    text = human.get_payload(decode=True).decode()
    assert "expired" in text and "3 days" in text


def test_expiry_without_an_smtp_reply() -> None:
    refused = RecipientResult("b@x.test", Outcome.TEMPFAIL, 0, "", "connection refused")
    _, _, report, _ = parse(bounce([refused], expired=True))
    assert report[1]["Status"] == "4.4.7"
    assert report[1]["Diagnostic-Code"] == "X-Gateway; connection refused"
    assert report[1]["Remote-MTA"] is None


def test_long_reply_is_folded_under_998_octets() -> None:
    words = " ".join(f"word{i}" for i in range(800))
    blob = "z" * 3000
    data = bounce([perm(text=words), perm("b@x.test", text=blob)])
    assert_canonical(data)
    _, human, report, _ = parse(data)
    assert unfold(report[1]["Diagnostic-Code"]) == f"smtp; 550 5.1.1 {words}"
    assert unfold(report[2]["Diagnostic-Code"]).replace(" ", "").endswith(blob)
    assert max(len(line) for line in human.get_payload().split("\n")) <= 78


def test_non_ascii_reply_is_encoded() -> None:
    data = bounce([perm(text="Benutzer Müller unbekannt ✉")])
    assert_canonical(data)
    _, human, report, _ = parse(data)
    assert report[1]["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 Benutzer M\\x{00FC}ller unbekannt \\x{2709}")
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    assert human.get_content_charset() == "utf-8"
    text = " ".join(human.get_payload(decode=True).decode("utf-8").split())
    assert "550 5.1.1 Benutzer Müller unbekannt ✉" in text


def test_reply_text_cannot_inject_fields_or_lines() -> None:
    evil = "bad\r\nStatus: 2.0.0\r\n\r\nFinal-Recipient: rfc822; evil@x.test\x00"
    data = bounce([perm(text=evil)])
    assert_canonical(data)
    _, _, report, _ = parse(data)
    assert len(report) == 2
    assert report[1]["Status"] == "5.1.1"
    assert b"\r\nStatus: 2.0.0" not in data
    assert b"\r\nFinal-Recipient: rfc822; evil" not in data


def test_8bit_original_headers_are_quoted_printable() -> None:
    original = b"Subject: caf\xc3\xa9\r\nX-Long: " + b"y" * 1200 + b"\r\n\r\nbody\r\n"
    data = bounce([perm()], message=original)
    assert_canonical(data)
    _, _, _, headers = parse(data)
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = headers.get_payload(decode=True)
    assert b"Subject: caf\xc3\xa9" in decoded
    assert b"y" * 1200 in decoded
    assert b"body" not in decoded


def test_message_without_body_and_huge_header_block() -> None:
    original = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 70) for i in range(2000))
    data = bounce([perm()], message=original)
    assert_canonical(data)
    assert len(data) < 80 * 1024  # the quoted headers are capped
    _, _, _, headers = parse(data)
    assert headers.get_payload(decode=True).startswith(b"X-Filler-0: ")


def test_boundary_never_appears_in_the_content() -> None:
    data = bounce([perm()])
    msg = email.message_from_bytes(data)
    boundary = msg.get_boundary()
    assert data.count(f"--{boundary}".encode()) == 4  # three parts and the close
