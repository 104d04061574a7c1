"""In memory (StringTransport, Clock): the AUTH throttle per user name, and the end of a
session refused at AUTH."""

from __future__ import annotations

from gateway.smtpd import CLOSE_GRACE
from test_smtpd_memory import Dialog, plain


def test_user_name_locked_from_every_address_before_the_backend_is_asked():
    first = Dialog(mode="submission", ip="192.0.2.1", tls=True)
    throttle = first.context.throttle
    codes = []
    for n, ip in enumerate(("192.0.2.1", "192.0.2.2", "192.0.2.3")):
        d = first if n == 0 else Dialog(mode="submission", ip=ip, tls=True, clock=first.clock)
        d.context.throttle = throttle
        d.send(b"EHLO c\r\n")
        codes += d.codes(b"AUTH PLAIN " + plain(b"alice", b"guess") + b"\r\n")
    assert codes == ["535 5.7.8", "535 5.7.8", "421 4.7.0"]  # the 3rd failure on "alice"
    late = Dialog(mode="submission", ip="192.0.2.4", tls=True, clock=first.clock)
    late.context.throttle = throttle
    late.checker.down = True  # the backend is not even asked: no 454
    late.send(b"EHLO c\r\n")
    assert late.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["421 4.7.0"]
    assert late.transport.disconnecting
    other = Dialog(mode="submission", ip="192.0.2.4", tls=True, clock=first.clock)
    other.context.throttle = throttle
    other.send(b"EHLO c\r\n")
    assert other.codes(b"AUTH PLAIN " + plain(b"bob", b"x") + b"\r\n") == ["535 5.7.8"]
    first.clock.advance(301)  # the failures age out
    again = Dialog(mode="submission", ip="192.0.2.5", tls=True, clock=first.clock)
    again.context.throttle = throttle
    again.send(b"EHLO c\r\n")
    assert again.codes(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n") == ["235 2.7.0"]


def test_closed_session_is_aborted_when_the_client_never_closes():
    d = Dialog(mode="submission", ip="192.0.2.9", tls=True)
    d.send(b"EHLO c\r\n")
    for _ in range(3):
        d.send(b"AUTH PLAIN " + plain(b"alice", b"wrong") + b"\r\n")
    assert d.transport.disconnecting
    aborts = [c for c in d.clock.getDelayedCalls() if "abortConnection" in repr(c.func)]
    assert len(aborts) == 1 and round(aborts[0].getTime(), 1) == round(
        d.clock.seconds() + CLOSE_GRACE, 1)
    assert not [c for c in d.clock.getDelayedCalls() if "session_expired" in repr(c.func)]
    d.clock.advance(CLOSE_GRACE)
    assert not d.clock.getDelayedCalls()
