"""The scheduler over a real Spool (tmp_path, real ThreadPool), a task.Clock and a fake Relay.

Time is the Clock's; disk work goes through the real reactor, so each step waits on
``scheduler.settle()`` (every attempt in flight has ended) before looking at the result.
"""

from __future__ import annotations

import email
import random
from collections.abc import Iterable

import pytest
import pytest_twisted
from twisted.internet import defer, task

from gateway.config import QueueSection
from gateway.delivery import AttemptResult, Outcome, RecipientResult
from gateway.envelope import Envelope, new_queue_id
from gateway.queuestate import BOUNCED, DELIVERED, PENDING
from gateway.scheduler import RESTART_SPREAD, STOP_TIMEOUT, Scheduler
from gateway.spool import Spool

HOST = "smtp.itpison.test:465"
SENDER = "s@example.test"
MESSAGE = b"Received: by gw.example.test\r\nSubject: hello\r\n\r\nbody\r\n"
OUTCOMES = {"2": (Outcome.DELIVERED, "2.0.0", "Ok"), "4": (Outcome.TEMPFAIL, "4.3.0", "Try later"),
            "5": (Outcome.PERMFAIL, "5.1.1", "User unknown")}


class MidRng(random.Random):
    """Jitter at its midpoint: delays come out exact."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class FakeRelay:
    """Answers per recipient from a script of codes ("250", "451", "550"; the last one
    repeats; default 250).  With ``manual=True`` each deliver() returns a Deferred the test
    fires with ``finish_one()``."""

    def __init__(self, script: dict[str, list[str]] | None = None, manual: bool = False,
                 fail: bool = False) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.manual = manual
        self.fail = fail
        self.calls: list[tuple[Envelope, bytes]] = []
        self.outstanding: list[tuple[defer.Deferred[AttemptResult], AttemptResult]] = []
        self.max_outstanding = 0
        self.cancelled = 0
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def _code(self, rcpt: str) -> str:
        codes = self.script.get(rcpt, ["250"])
        return codes.pop(0) if len(codes) > 1 else codes[0]

    def deliver(self, envelope: Envelope, message: bytes) -> defer.Deferred[AttemptResult]:
        self.calls.append((envelope, message))
        self._notify()
        if self.fail:
            return defer.fail(RuntimeError("relay bug"))
        results = []
        for rcpt in envelope.recipients:
            code = self._code(rcpt)
            outcome, enhanced, text = OUTCOMES[code[0]]
            results.append(RecipientResult(rcpt, outcome, int(code), enhanced, text, HOST))
        result = AttemptResult(HOST, tuple(results))
        if not self.manual:
            return defer.succeed(result)

        def cancel(d: defer.Deferred[AttemptResult]) -> None:
            self.cancelled += 1
            self.outstanding[:] = [o for o in self.outstanding if o[0] is not d]

        d: defer.Deferred[AttemptResult] = defer.Deferred(cancel)
        self.outstanding.append((d, result))
        self.max_outstanding = max(self.max_outstanding, len(self.outstanding))
        return d

    def _notify(self) -> None:
        """Wake waiters on the next reactor turn, not inside the scheduler's call."""
        from twisted.internet import reactor

        for waiter in [w for w in self._waiters if len(self.calls) >= w[0]]:
            self._waiters.remove(waiter)
            reactor.callLater(0, waiter[1].callback, None)

    def called(self, n: int) -> defer.Deferred[None]:
        """Fires once deliver() has been called ``n`` times in all."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.calls) >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    def finish_one(self) -> None:
        d, result = self.outstanding.pop(0)
        d.callback(result)

    def recipients(self, call: int) -> tuple[str, ...]:
        return self.calls[call][0].recipients


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


class Harness:
    def __init__(self, spool: Spool, clock: task.Clock) -> None:
        self.spool = spool
        self.clock = clock
        self.schedulers: list[Scheduler] = []

    async def start(self, relay: FakeRelay, rng: random.Random | None = None,
                    **cfg: float) -> Scheduler:
        queue = QueueSection(**{"retry_min": 60.0, "retry_max": 3600.0, "max_lifetime": 86400.0,
                                "concurrency": 4, **cfg})
        sched = Scheduler(self.spool, relay, queue, "gw.example.test", self.clock,
                          rng or MidRng())
        self.schedulers.append(sched)
        sched.startService()
        await sched.ready
        return sched

    async def submit(self, sched: Scheduler, recipients: Iterable[str], sender: str = SENDER,
                     settle: bool = True) -> Envelope:
        env = Envelope(new_queue_id(), sender, tuple(recipients), self.clock.seconds(),
                       size=len(MESSAGE))
        await self.spool.submit(env, MESSAGE)
        sched.enqueue(env)
        if settle:
            await sched.settle()
        return env

    async def advance(self, sched: Scheduler, seconds: float) -> None:
        self.clock.advance(seconds)
        await sched.settle()

    def queue(self) -> list[str]:
        return sorted(p.name for p in (self.spool.root / "queue").iterdir())

    def wakeups(self) -> list[float]:
        return sorted(c.getTime() for c in self.clock.getDelayedCalls())


@pytest_twisted.async_yield_fixture()
async def rig(spool: Spool, clock: task.Clock):
    h = Harness(spool, clock)
    yield h
    for sched in h.schedulers:
        if sched.running:
            stopped = sched.stopService()
            clock.advance(STOP_TIMEOUT)  # a failed test may leave attempts hanging
            await stopped
    assert clock.getDelayedCalls() == []


def dsn_fields(message: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(message)
    assert msg.get_content_type() == "multipart/report"
    return msg.get_payload()[1].get_payload()


# --- delivery outcomes -------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_immediate_delivery(rig: Harness) -> None:
    relay = FakeRelay()
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test", "b@x.test"])
    assert len(relay.calls) == 1
    sent_env, sent_msg = relay.calls[0]
    assert sent_env.queue_id == env.queue_id
    assert sent_env.recipients == ("a@x.test", "b@x.test")
    assert sent_msg == MESSAGE
    assert rig.queue() == []
    assert await rig.spool.load_state(env.queue_id) is None
    assert rig.wakeups() == []


@pytest_twisted.ensureDeferred
async def test_tempfail_retries_with_exponential_backoff(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451"] * 4 + ["250"]})
    sched = await rig.start(relay, retry_min=60, retry_max=200)
    env = await rig.submit(sched, ["a@x.test"])
    expected_delays = [60, 120, 200, 200]  # 60·2^n, capped at retry_max
    for attempt, delay in enumerate(expected_delays, start=1):
        now = rig.clock.seconds()
        assert rig.wakeups() == [now + delay]
        state = await rig.spool.load_state(env.queue_id)
        assert state.attempts == attempt and state.next_attempt == now + delay
        assert state.get("a@x.test").status == PENDING
        assert state.get("a@x.test").code == 451
        await rig.advance(sched, delay - 1)
        assert len(relay.calls) == attempt  # not a second early
        await rig.advance(sched, 1)
        assert len(relay.calls) == attempt + 1
    assert rig.queue() == []
    assert len(relay.calls) == 5


@pytest_twisted.ensureDeferred
async def test_jitter_stays_within_20_percent(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451"]})
    sched = await rig.start(relay, rng=random.Random(7), retry_min=100, retry_max=10000)
    env = await rig.submit(sched, ["a@x.test"])
    delays = []
    for attempt in range(1, 6):
        state = await rig.spool.load_state(env.queue_id)
        delay = state.next_attempt - rig.clock.seconds()
        base = 100 * 2 ** (attempt - 1)
        assert 0.8 * base <= delay <= 1.2 * base
        delays.append(delay / base)
        await rig.advance(sched, delay)
    assert len(set(delays)) > 1  # the jitter is really random


@pytest_twisted.ensureDeferred
async def test_permanent_failure_bounces_to_the_sender(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["550"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    assert len(relay.calls) == 2  # the original, then the bounce
    dsn_env, dsn = relay.calls[1]
    assert dsn_env.sender == ""
    assert dsn_env.recipients == (SENDER,)
    assert dsn_env.extra == {"bounce_of": env.queue_id}
    report = dsn_fields(dsn)
    assert report[1]["Final-Recipient"] == "rfc822; a@x.test"
    assert report[1]["Status"] == "5.1.1"
    assert report[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert rig.queue() == []  # the original is removed, the bounce delivered


@pytest_twisted.ensureDeferred
async def test_bounce_is_queued_before_the_original_goes(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["550"], SENDER: ["451"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    (dsn_id,) = rig.queue()
    assert dsn_id != env.queue_id
    dsn_env, _ = await rig.spool.read(dsn_id)
    assert dsn_env.sender == "" and dsn_env.recipients == (SENDER,)


@pytest_twisted.ensureDeferred
async def test_mixed_recipients_retry_only_the_pending(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["250"], "b@x.test": ["451", "250"], "c@x.test": ["550"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test", "b@x.test", "c@x.test"])
    assert relay.recipients(0) == ("a@x.test", "b@x.test", "c@x.test")
    state = await rig.spool.load_state(env.queue_id)
    assert [r.status for r in state.recipients] == [DELIVERED, PENDING, BOUNCED]
    assert len(relay.calls) == 1  # no bounce while b is pending
    await rig.advance(sched, 60)
    assert relay.recipients(1) == ("b@x.test",)
    assert relay.recipients(2) == (SENDER,)  # the bounce, for c only
    report = dsn_fields(relay.calls[2][1])
    assert [r["Final-Recipient"] for r in report[1:]] == ["rfc822; c@x.test"]
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_expiry_bounces_with_4_4_7(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451"]})
    sched = await rig.start(relay, retry_min=600, max_lifetime=1000)
    env = await rig.submit(sched, ["a@x.test"])
    await rig.advance(sched, 600)
    assert (await rig.spool.load_state(env.queue_id)).next_attempt == 1000  # not 1800
    await rig.advance(sched, 400)
    assert [c[0].recipients for c in relay.calls] == [("a@x.test",)] * 3 + [(SENDER,)]
    report = dsn_fields(relay.calls[3][1])
    assert report[1]["Status"] == "4.4.7"
    assert report[1]["Action"] == "failed"
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_null_sender_failure_gets_no_bounce(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["550"]})
    sched = await rig.start(relay)
    await rig.submit(sched, ["a@x.test"], sender="")
    assert len(relay.calls) == 1
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_relay_errback_is_a_tempfail(rig: Harness) -> None:
    relay = FakeRelay(fail=True)
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test", "b@x.test"])
    state = await rig.spool.load_state(env.queue_id)
    assert state.pending() == ["a@x.test", "b@x.test"]
    assert "relay bug" in state.get("a@x.test").text
    assert rig.wakeups() == [60]


@pytest_twisted.ensureDeferred
async def test_corrupt_message_does_not_stop_the_scheduler(rig: Harness) -> None:
    relay = FakeRelay()
    sched = await rig.start(relay)
    bad = Envelope(new_queue_id(), SENDER, ("a@x.test",), 0.0)
    (rig.spool.root / "queue" / bad.queue_id).write_bytes(b"ITPQ1 10 10\n{}")
    sched.enqueue(bad)
    await sched.settle()
    assert relay.calls == []
    assert (rig.spool.root / "corrupt" / bad.queue_id).exists()
    await rig.submit(sched, ["a@x.test"])
    assert len(relay.calls) == 1 and rig.queue() == []


# --- concurrency, restart, shutdown ------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_concurrency_cap(rig: Harness) -> None:
    relay = FakeRelay(manual=True)
    sched = await rig.start(relay, concurrency=2)
    for _ in range(5):
        await rig.submit(sched, ["a@x.test"], settle=False)
    await relay.called(2)
    assert len(sched.in_flight) == 2
    for n in range(3, 6):
        relay.finish_one()
        await relay.called(n)
        assert len(sched.in_flight) == 2
    while relay.outstanding:
        relay.finish_one()
    await sched.settle()
    assert relay.max_outstanding == 2
    assert len(relay.calls) == 5
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_restart_resumes_without_redelivering(rig: Harness) -> None:
    first = FakeRelay({"a@x.test": ["250"], "b@x.test": ["451"]})
    sched = await rig.start(first)
    env = await rig.submit(sched, ["a@x.test", "b@x.test"])
    await sched.stopService()

    second = FakeRelay()
    sched2 = await rig.start(second)
    assert rig.wakeups() == [60]  # the saved next-attempt time, not "now"
    await rig.advance(sched2, 60)
    assert second.recipients(0) == ("b@x.test",)
    assert second.calls[0][0].queue_id == env.queue_id
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_restart_spreads_overdue_messages(rig: Harness) -> None:
    first = FakeRelay({"a@x.test": ["451"]})
    sched = await rig.start(first)
    for _ in range(5):
        await rig.submit(sched, ["a@x.test"])
    await sched.stopService()
    rig.clock.advance(5000)  # the gateway was down: everything is overdue

    second = FakeRelay()
    await rig.start(second, rng=random.Random(3), retry_min=600)
    due = [(await rig.spool.load_state(q)) for q in rig.queue()]
    assert all(s.next_attempt < 5000 for s in due)
    assert second.calls == []  # nothing at once
    (wakeup,) = rig.wakeups()
    assert 5000 <= wakeup <= 5000 + RESTART_SPREAD
    sched2 = rig.schedulers[-1]
    await rig.advance(sched2, RESTART_SPREAD)
    assert len(second.calls) == 5
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_new_message_found_at_start_is_delivered(rig: Harness) -> None:
    env = Envelope(new_queue_id(), SENDER, ("a@x.test",), 0.0)
    await rig.spool.submit(env, MESSAGE)  # accepted, then the gateway crashed
    relay = FakeRelay()
    sched = await rig.start(relay, retry_min=10)
    await rig.advance(sched, 10)
    assert relay.recipients(0) == ("a@x.test",)
    assert rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_attempts_in_flight(rig: Harness) -> None:
    relay = FakeRelay(manual=True)
    sched = await rig.start(relay)
    await rig.submit(sched, ["a@x.test"], settle=False)
    await relay.called(1)
    stopped = sched.stopService()
    assert not stopped.called
    relay.finish_one()
    await stopped
    assert rig.queue() == []  # the attempt completed and was recorded
    assert relay.cancelled == 0


@pytest_twisted.ensureDeferred
async def test_stop_starts_no_new_relay_call(rig: Harness) -> None:
    relay = FakeRelay()
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"], settle=False)
    assert sched.in_flight == {env.queue_id}  # reading the message from disk
    await sched.stopService()
    assert relay.calls == []
    assert rig.queue() == [env.queue_id]


@pytest_twisted.ensureDeferred
async def test_stop_cancels_after_the_bound_and_keeps_the_message(rig: Harness) -> None:
    relay = FakeRelay(manual=True)
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"], settle=False)
    await relay.called(1)
    stopped = sched.stopService()
    rig.clock.advance(STOP_TIMEOUT - 0.1)
    assert not stopped.called
    rig.clock.advance(0.1)
    await stopped
    assert relay.cancelled == 1
    assert rig.queue() == [env.queue_id]
    state = await rig.spool.load_state(env.queue_id)
    assert state is None or state.pending() == ["a@x.test"]

    again = FakeRelay()
    sched2 = await rig.start(again)
    await rig.advance(sched2, RESTART_SPREAD)
    assert again.recipients(0) == ("a@x.test",)
    assert rig.queue() == []


# --- admin -------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_flush_makes_deferred_mail_due_now(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451", "250"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    assert sched.flush(["UNKNOWN"]) == []
    assert sched.flush() == [env.queue_id]
    await sched.settle()
    assert len(relay.calls) == 2 and rig.queue() == []


@pytest_twisted.ensureDeferred
async def test_hold_and_release(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451", "250"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    await sched.hold(env.queue_id)
    assert rig.queue() == []
    assert await rig.spool.held() == [env.queue_id]
    assert sched.flush() == []
    await rig.advance(sched, 3600)
    assert len(relay.calls) == 1  # held mail is not tried
    await sched.release(env.queue_id)
    await sched.settle()
    assert len(relay.calls) == 2
    assert rig.queue() == [] and await rig.spool.held() == []


@pytest_twisted.ensureDeferred
async def test_hold_waits_for_the_attempt_in_flight(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451"]}, manual=True)
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"], settle=False)
    await relay.called(1)
    held = sched.hold(env.queue_id)
    assert not held.called
    relay.finish_one()
    await held
    assert await rig.spool.held() == [env.queue_id]
    assert rig.wakeups() == []  # its retry was not scheduled


@pytest_twisted.ensureDeferred
async def test_delete(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["451"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    await sched.delete(env.queue_id)
    assert rig.queue() == []
    assert await rig.spool.load_state(env.queue_id) is None
    await rig.advance(sched, 3600)
    assert len(relay.calls) == 1


@pytest_twisted.ensureDeferred
async def test_admin_bounce(rig: Harness) -> None:
    relay = FakeRelay({"a@x.test": ["250"], "b@x.test": ["451"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test", "b@x.test"])
    await sched.bounce(env.queue_id)
    await sched.settle()
    dsn_env, dsn = relay.calls[-1]
    assert dsn_env.recipients == (SENDER,)
    report = dsn_fields(dsn)
    assert [r["Final-Recipient"] for r in report[1:]] == ["rfc822; b@x.test"]
    assert rig.queue() == []
    await rig.advance(sched, 3600)
    assert len(relay.calls) == 2


@pytest_twisted.ensureDeferred
async def test_failed_admin_action_reschedules(rig: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = FakeRelay({"a@x.test": ["451", "250"]})
    sched = await rig.start(relay)
    env = await rig.submit(sched, ["a@x.test"])
    monkeypatch.setattr(rig.spool, "hold", lambda qid: defer.fail(OSError("disk gone")))
    with pytest.raises(OSError):
        await sched.hold(env.queue_id)
    await rig.advance(sched, 60)
    assert len(relay.calls) == 2 and rig.queue() == []


# --- the shared outbound cap (ratelimit.RateLimiter as the scheduler's outbound gate) ----

@pytest_twisted.ensureDeferred
async def test_outbound_cap_defers_without_counting_an_attempt(spool: Spool,
                                                               clock: task.Clock) -> None:
    from twisted.internet import reactor

    from gateway.config import RateLimitSection
    from gateway.ratelimit import RateLimiter
    from gateway.ratelimit_local import LocalStore

    limiter = RateLimiter(RateLimitSection(outbound_messages_per_second=1, outbound_connections=1),
                          LocalStore(clock), clock)
    relay = FakeRelay(manual=True)
    queue = QueueSection(retry_min=60.0, retry_max=3600.0, max_lifetime=86400.0, concurrency=4)
    sched = Scheduler(spool, relay, queue, "gw.example.test", clock, MidRng(), outbound=limiter)
    sched.startService()
    await sched.ready
    h = Harness(spool, clock)
    envs = [await h.submit(sched, [f"r{i}@example.net"], settle=False) for i in range(3)]
    await relay.called(1)
    for _ in range(20):                       # let the other two reach the gate
        await task.deferLater(reactor, 0.01, lambda: None)
    assert len(relay.calls) == 1 and len(relay.outstanding) == 1   # one connection at a time
    relay.finish_one()
    await relay.called(1)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert len(relay.calls) == 1              # the others wait for their retry (1.25 s)
    clock.advance(1.25)
    await relay.called(2)
    assert len(relay.calls) == 2
    waiting = [e for e in envs if e.recipients != relay.recipients(0)
               and e.recipients != relay.recipients(1)]
    state = await spool.load_state(waiting[0].queue_id)
    assert state is None or state.attempts == 0   # being held back is not an attempt
    relay.finish_one()
    clock.advance(1.25)
    await relay.called(3)
    relay.finish_one()
    await sched.settle()
    await sched.stopService()
