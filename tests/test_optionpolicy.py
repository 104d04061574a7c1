"""X-Header checks, defaults, precedence, forcing, permissions: tables, no sockets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway import xheaders as X
from gateway.config_values import ConfigError, Context
from gateway.optionpolicy import Submitter, XHeaderPolicy
from gateway.options_config import parse_options
from gateway.reply import ReplyError

NOW = datetime(2026, 12, 4, 1, 0, tzinfo=UTC).timestamp()  # 09:00 in Taipei
ALICE = Submitter("alice", True)
TRUSTED = Submitter("10.0.0.5", False)


def policy(**options: Any) -> XHeaderPolicy:
    return XHeaderPolicy(parse_options(options, Context(Path("/nonexistent"), {})))


def message(*headers: str) -> bytes:
    return ("From: a@corp.example\r\n" + "".join(h + "\r\n" for h in headers)
            + "Subject: s\r\n\r\nbody\r\n").encode()


def sent(p: XHeaderPolicy, msg: bytes, who: Submitter = ALICE) -> list[str]:
    return [f"{h.name}: {v}" for h, v in p.apply(who, msg, NOW, "QID1").headers]


def refusal(p: XHeaderPolicy, msg: bytes, who: Submitter = ALICE) -> str:
    with pytest.raises(ReplyError) as info:
        p.apply(who, msg, NOW, "QID1")
    return str(info.value.reply)


# --- every header: accepted values and what is sent -------------------------------------
GOOD = [
    ("X-JobName", "Spring sale 2026", "Spring sale 2026"),
    ("X-JobName", "=?UTF-8?B?5ris6Kmm?=", "=?UTF-8?B?5ris6Kmm?="),
    ("X-RefNumber", "ORD-2026/0001", "ORD-2026/0001"),
    ("X-NextLaunchTime", "2026-12-05T09:00:00+08:00", "2026-12-05T09:00:00+08:00"),
    ("X-NextLaunchTime", "Sat, 05 Dec 2026 09:00:00 +0800", "2026-12-05T09:00:00+08:00"),
    ("X-NextLaunchTime", "2026-12-05 01:00Z", "2026-12-05T01:00:00+00:00"),
    ("X-LaunchExpireTime", "2026-12-31T23:59:59.5-05:00", "2026-12-31T23:59:59-05:00"),
    ("X-LaunchType", "2", "2"),
    ("X-LaunchClass", " 0 ", "0"),
    ("X-LaunchOption", "1024", "1024"),
    ("X-JobOption", "cJBCreateReportMask|AddOutlookReadReceipt", "536870916"),
    ("X-JobOption", "2147483648", "2147483648"),
    ("X-ListOption", "65536", "65536"),
    ("X-LinkOption", "NotTrackOpen, NotTrackAllLink", "192"),
    ("X-SendOption", "4", "4"),
    ("X-SendOption", "SendSubListOnly", "3"),
]

BAD = [
    ("X-JobName", "", "empty value"),
    ("X-JobName", "<script>", "only printable ASCII"),
    ("X-JobName", "a" * 129, "longer than 128 characters"),
    ("X-JobName", "=?utf-8?q?a=01b?=", "control characters in the encoded-word"),
    ("X-RefNumber", "ref number", "only letters, digits"),
    ("X-RefNumber", "r" * 65, "longer than 64"),
    ("X-NextLaunchTime", "tomorrow", "not a date-time in RFC 5322 or ISO 8601"),
    ("X-NextLaunchTime", "2026-12-05 09:00", "time without a time zone"),
    ("X-NextLaunchTime", "2026-02-30T09:00Z", "not a valid date and time"),
    ("X-NextLaunchTime", "2028-01-01T00:00Z", "more than 365d ahead"),
    ("X-LaunchExpireTime", "2026-12-03T09:00Z", "already past"),
    ("X-LaunchType", "-1", "not a number 0..2147483647"),
    ("X-LaunchClass", "2147483648", "not a number 0..2147483647"),
    ("X-LaunchOption", "2048", "unknown bits 2048 (not in the guide's LaunchOption)"),
    ("X-JobOption", "4096", "unknown bits 4096"),
    ("X-ListOption", "4", "unknown bits 4"),
    ("X-LinkOption", "64x", "is not a LinkOption name"),
    ("X-LinkOption", "4294967296", "outside 0..4294967295"),
    ("X-SendOption", "5", "SendOption 5 is out of range 0..4"),
    ("X-SendOption", "16", "unknown bits 16"),
    ("X-SendOption", "SendEverything", "is not a SendOption name"),
]


@pytest.mark.parametrize("header,value,expected", GOOD)
def test_good_values_are_sent_normalised(header: str, value: str, expected: str) -> None:
    assert sent(policy(), message(f"{header}: {value}")) == [f"{header}: {expected}"]


@pytest.mark.parametrize("header,value,reason", BAD)
def test_bad_values_get_550_naming_header_and_reason(header: str, value: str, reason: str) -> None:
    text = refusal(policy(), message(f"{header}: {value}"))
    assert text.startswith(f"550 5.6.0 {header}: ") and reason in text, text


@pytest.mark.parametrize("header", [h.name for h in X.HEADERS])
def test_every_header_once_only(header: str) -> None:
    value = {"text": "x", "ref": "x", "time": "2026-12-05T00:00Z"}.get(X.spec(header).kind, "0")
    text = refusal(policy(), message(f"{header}: {value}", f"{header.upper()}: {value}"))
    assert text == f"550 5.6.0 {header}: appears 2 times; send it once"


def test_non_ascii_and_folded_values() -> None:
    latin1 = message("X-JobName: caf\xe9").replace("\xe9".encode(), b"\xe9")
    assert refusal(policy(), latin1) == "550 5.6.0 X-JobName: non-ASCII characters"
    assert sent(policy(), message("X-LinkOption: NotTrackOpen |\r\n\tNotTrackAllLink")) == ["X-LinkOption: 192"]


def test_expiry_must_follow_launch() -> None:
    text = refusal(policy(), message("X-NextLaunchTime: 2026-12-06T00:00Z",
                                     "X-LaunchExpireTime: 2026-12-05T00:00Z"))
    assert text == "550 5.6.0 X-LaunchExpireTime: must be after X-NextLaunchTime"


def test_local_time_zone_and_rfc5322_output() -> None:
    p = policy(local_time_zone="Asia/Taipei", time_format="rfc5322")
    assert sent(p, message("X-NextLaunchTime: 2026/12/05 09:30")) == [
        "X-NextLaunchTime: Sat, 05 Dec 2026 09:30:00 +0800"]


def test_unknown_bits_strip_per_header() -> None:
    p = policy(unknown_bits={"job_option": "strip", "send_option": "strip"})
    assert sent(p, message("X-JobOption: 4100", "X-SendOption: 20")) == [
        "X-JobOption: 4", "X-SendOption: 4"]
    assert "unknown bits 4" in refusal(p, message("X-ListOption: 5"))


# --- rewriting: other headers untouched -------------------------------------------------

def test_message_without_control_headers_is_untouched() -> None:
    msg = message("X-Other: 1")
    assert policy().apply(ALICE, msg, NOW, "Q").message is msg


def test_rewrite_keeps_every_other_byte() -> None:
    msg = b"From: a@b\r\nx-linkoption: 64\r\nSubject: folded\r\n  line\r\n\r\nX-LinkOption: 1\r\n"
    out = policy(defaults={"send_option": "SendBothList"}).apply(ALICE, msg, NOW, "Q").message
    assert out == (b"From: a@b\r\nSubject: folded\r\n  line\r\nX-LinkOption: 64\r\n"
                   b"X-SendOption: 4\r\n\r\nX-LinkOption: 1\r\n")


# --- defaults, precedence, force ------------------------------------------------------------

LAYERED = dict(
    defaults={"link_option": ["NotTrackOpen"], "send_option": 1, "launch_type": 2},
    groups={"sales": {"defaults": {"send_option": 2}}, "ops": {"defaults": {"send_option": 3}}},
    users={"alice": {"groups": ["ops"], "defaults": {"launch_type": 5}}},
    trusted={"defaults": {"job_name": "internal"}})


@pytest.mark.parametrize("who,expected", [
    (Submitter("bob", True), ["X-LaunchType: 2", "X-LinkOption: 64", "X-SendOption: 1"]),
    (Submitter("bob", True, ("ops",)), ["X-LaunchType: 2", "X-LinkOption: 64", "X-SendOption: 3"]),
    (Submitter("bob", True, ("ops", "sales")),  # sales is first in the file: it wins
     ["X-LaunchType: 2", "X-LinkOption: 64", "X-SendOption: 2"]),
    (ALICE, ["X-LaunchType: 5", "X-LinkOption: 64", "X-SendOption: 3"]),
    (Submitter("carol", True, (), {"launch_type": "7", "link_option": ["NotTrackAllLink"]}),
     ["X-LaunchType: 7", "X-LinkOption: 128", "X-SendOption: 1"]),
    (TRUSTED, ["X-JobName: internal", "X-LaunchType: 2", "X-LinkOption: 64", "X-SendOption: 1"]),
])
def test_default_layers(who: Submitter, expected: list[str]) -> None:
    assert sent(policy(**LAYERED), message(), who) == expected


@pytest.mark.parametrize("precedence,expected", [("message", "2"), ("default", "64")])
def test_precedence(precedence: str, expected: str) -> None:
    p = policy(defaults={"link_option": 64}, precedence={"link_option": precedence})
    assert sent(p, message("X-LinkOption: 2")) == [f"X-LinkOption: {expected}"]


@pytest.mark.parametrize("value,expected", [(None, "64"), ("0", "64"), ("256", "320"),
                                            ("65", "64"), ("193", "192")])
def test_force_on_and_off(value: str | None, expected: str) -> None:
    p = policy(force_on={"link_option": ["NotTrackOpen"]}, force_off={"link_option": 1})
    msg = message(*([f"X-LinkOption: {value}"] if value else []))
    assert sent(p, msg) == [f"X-LinkOption: {expected}"]


def test_force_off_alone_sends_nothing_when_absent() -> None:
    assert sent(policy(force_off={"list_option": 65536}), message()) == []


# --- permissions -----------------------------------------------------------------------------

PERMS = dict(deny={"list_option": ["BypassAllListProcessFilter"], "job_name": True,
                   "send_option": ["SendSubListOnly"]},
             groups={"bulk": {"allow": {"list_option": 65536}}},
             users={"root": {"allow": {"job_name": True}}},
             trusted={"allow": {"send_option": [3]}})


@pytest.mark.parametrize("who,header,result", [
    (ALICE, "X-ListOption: 65537", "550 5.7.1 X-ListOption: bits 65536 not permitted"),
    (Submitter("al", True, ("bulk",)), "X-ListOption: 65537", "X-ListOption: 65537"),
    (ALICE, "X-ListOption: 1", "X-ListOption: 1"),
    (ALICE, "X-JobName: x", "550 5.7.1 X-JobName: setting this header not permitted"),
    (Submitter("root", True), "X-JobName: x", "X-JobName: x"),
    (ALICE, "X-SendOption: 3", "550 5.7.1 X-SendOption: value 3 not permitted"),
    (ALICE, "X-SendOption: 2", "X-SendOption: 2"),
    (TRUSTED, "X-SendOption: 3", "X-SendOption: 3"),
])
def test_permissions_refuse(who: Submitter, header: str, result: str) -> None:
    p = policy(**PERMS)
    if result.startswith("550"):
        assert refusal(p, message(header), who) == result
    else:
        assert sent(p, message(header), who) == [result]


def test_permissions_strip() -> None:
    p = policy(forbidden="strip", **PERMS)
    outcome = p.apply(ALICE, message("X-ListOption: 65537", "X-JobName: x"), NOW, "Q")
    assert [f"{h.name}: {v}" for h, v in outcome.headers] == ["X-ListOption: 1"]
    assert any("bits 65536 not permitted for alice: stripped" in n for n in outcome.notes)


def test_defaults_are_not_subject_to_deny() -> None:
    p = policy(deny={"link_option": True}, defaults={"link_option": 64})
    assert sent(p, message()) == ["X-LinkOption: 64"]


# --- generated values --------------------------------------------------------------------

def test_generated_job_name_and_ref_number() -> None:
    p = policy(job_name_template="{user}-{date}-{time}", ref_number_template="gw-{queue_id}",
               local_time_zone="Asia/Taipei")
    assert sent(p, message()) == ["X-JobName: alice-20261204-090000", "X-RefNumber: gw-QID1"]
    assert sent(p, message("X-JobName: mine")) == ["X-JobName: mine", "X-RefNumber: gw-QID1"]
    assert sent(p, message(), Submitter('a"b<c', True))[0] == "X-JobName: a_b_c-20261204-090000"


def test_broken_directory_defaults_are_temporary() -> None:
    who = Submitter("dave", True, (), {"link_option": "NoSuchOption"})
    assert refusal(policy(), message(), who).startswith("451 4.3.5")


# --- configuration errors name the key ----------------------------------------------------

@pytest.mark.parametrize("options,path,text", [
    ({"defaults": {"link_optoin": 1}}, "options.defaults.link_optoin", "not a control header"),
    ({"defaults": {"link_option": ["NotTrackOpn"]}}, "options.defaults.link_option", "not a LinkOption name"),
    ({"defaults": {"link_option": 32768}}, "options.defaults.link_option", "not in the guide's LinkOption"),
    ({"defaults": {"next_launch_time": "2026-12-05T00:00Z"}}, "options.defaults.next_launch_time", "cannot be a default"),
    ({"defaults": {"send_option": 9}}, "options.defaults.send_option", "out of range"),
    ({"force_on": {"send_option": 1}}, "options.force_on.send_option", "not a bitmask header"),
    ({"force_on": {"link_option": 64}, "force_off": {"link_option": 64}}, "options.force_off.link_option", "force_on also sets"),
    ({"precedence": {"link_option": "both"}}, "options.precedence.link_option", "message, default"),
    ({"unknown_bits": {"job_name": "strip"}}, "options.unknown_bits.job_name", "has no bits"),
    ({"deny": {"job_name": ["x"]}}, "options.deny.job_name", "takes true or false"),
    ({"users": {"a": {"groups": ["nope"]}}}, "options.users.a.groups", "no [options.groups.nope]"),
    ({"groups": {"g": {"groups": []}}}, "options.groups.g.groups", "unknown key"),
    ({"job_name_template": "{user}-{day}"}, "options.job_name_template", "unknown field {day}"),
    ({"local_time_zone": "Mars/Olympus"}, "options.local_time_zone", "unknown time zone"),
    ({"colour": 1}, "options.colour", "unknown key"),
])
def test_config_errors(options: dict, path: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(**options)
    assert info.value.path == path and text in info.value.message, str(info.value)


def test_groups_come_from_the_users_file_through_the_principal(tmp_path: Path) -> None:
    from gateway.auth import Principal, SenderPolicy
    from gateway.auth_file import FileChecker, load_users, set_user

    set_user(tmp_path / "u.toml", "alice", "pw", ["*"], ["bulk", "ops"])
    set_user(tmp_path / "u.toml", "alice", "pw2")  # keeps senders and groups
    record = load_users(tmp_path / "u.toml")["alice"]
    assert record.groups == ("bulk", "ops")
    identity = FileChecker._decide(True, record)
    principal = Principal(identity.account, "file", True, SenderPolicy(("*",)),
                          identity.attributes)
    assert Submitter.from_session(principal, "10.0.0.1") == Submitter("alice", True,
                                                                      ("bulk", "ops"))
    assert Submitter.from_session(None, "10.0.0.1") == Submitter("10.0.0.1", False)
