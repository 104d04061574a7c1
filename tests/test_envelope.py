"""Strict address grammar: what a client may put in MAIL FROM / RCPT TO."""

from __future__ import annotations

import pytest

from gateway import reply as R
from gateway.envelope import (
    NULL_SENDER,
    Address,
    Envelope,
    new_queue_id,
    parse_path_and_params,
)
from gateway.reply import ReplyError


@pytest.mark.parametrize("arg,expected,params", [
    ("<alice@Example.COM>", Address("alice", "example.com"), {}),
    (" <alice@example.com>", Address("alice", "example.com"), {}),
    ("alice@example.com", Address("alice", "example.com"), {}),
    ("<a.b+tag@sub.example.com> SIZE=100 BODY=8BITMIME", Address("a.b+tag", "sub.example.com"),
     {"SIZE": "100", "BODY": "8BITMIME"}),
    ('<"john doe"@example.com>', Address('"john doe"', "example.com"), {}),
    ('<"a>b"@example.com>', Address('"a>b"', "example.com"), {}),
    ("<@relay.example,@other.example:bob@example.com>", Address("bob", "example.com"), {}),
    ("<bob@[192.0.2.1]>", Address("bob", "[192.0.2.1]"), {}),
    ("<bob@[IPv6:2001:db8::1]>", Address("bob", "[IPv6:2001:db8::1]"), {}),
    ("<bob%other.example@example.com>", Address("bob%other.example", "example.com"), {}),
])
def test_valid_paths(arg, expected, params):
    assert parse_path_and_params(arg, is_sender=False) == (expected, params)


def test_null_sender_only_for_mail():
    assert parse_path_and_params("<>", is_sender=True) == (NULL_SENDER, {})
    with pytest.raises(ReplyError) as e:
        parse_path_and_params("<>", is_sender=False)
    assert e.value.reply == R.BAD_RCPT_SYNTAX


@pytest.mark.parametrize("arg,reply", [
    ('<"a\nRCPT TO:<evil@z.test>\n"@x.test>', R.BAD_RCPT_SYNTAX),  # twisted-notes §1.4
    ("<a\r@x.test>", R.BAD_RCPT_SYNTAX),
    ("<a\x00b@x.test>", R.BAD_RCPT_SYNTAX),
    ("<postmaster>", R.BAD_RCPT_SYNTAX),
    ("<a@b@c.test>", R.BAD_RCPT_SYNTAX),
    ("<a..b@x.test>", R.BAD_RCPT_SYNTAX),
    ("<.a@x.test>", R.BAD_RCPT_SYNTAX),
    ("<a@-x.test>", R.BAD_RCPT_SYNTAX),
    ("<a@x_y.test>", R.BAD_RCPT_SYNTAX),
    ("<a@[300.1.1.1]>", R.BAD_RCPT_SYNTAX),
    ("<a@x.test", R.BAD_RCPT_SYNTAX),
    ("<a@x.test>junk", R.BAD_RCPT_SYNTAX),
    ("<" + "a" * 65 + "@x.test>", R.BAD_RCPT_SYNTAX),
    ("<" + "a" * 60 + "@" + "b" * 200 + ".test>", R.BAD_RCPT_SYNTAX),
    ("<jöran@x.test>", R.NON_ASCII_ADDRESS),
    ("<a@x.test> SIZE", None),  # a keyword without value is syntactically fine
    ("<a@x.test> =x", R.SYNTAX_ERROR),
    ("<a@x.test> SIZE=1 SIZE=2", R.SYNTAX_ERROR),
])
def test_invalid_paths(arg, reply):
    if reply is None:
        parse_path_and_params(arg, is_sender=False)
        return
    with pytest.raises(ReplyError) as e:
        parse_path_and_params(arg, is_sender=False)
    assert e.value.reply == reply


def test_queue_ids_unique_ordered_and_filename_safe():
    ids = [new_queue_id(1_700_000_000 + i) for i in range(100)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100
    assert all(i.isalnum() and i.isupper() or i.isdigit() for i in ids)


def test_envelope_json_roundtrip():
    env = Envelope("Q1", "a@b.test", ("c@d.test", "e@f.test"), 12.5, client_ip="::1",
                   auth_user="alice", body_8bit=True, size=10)
    assert Envelope.from_json(env.to_json()) == env
