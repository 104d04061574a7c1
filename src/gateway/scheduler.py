"""The queue manager: decides when each spooled message is tried and what a result means.

Messages wait in a due-time heap; one ``clock.callLater`` wakes the scheduler for the
next due message (no polling), and at most ``queue.concurrency`` attempts run at once.
An attempt reads the message, hands the still-pending recipients to the Relay, and
persists the per-recipient outcome *before* doing anything else:

- DELIVERED → delivered; PERMFAIL → bounced;
- TEMPFAIL → pending and retried after ``retry_min * 2**(attempts-1)`` (capped at
  ``retry_max``, ±20% jitter), unless the message is older than ``max_lifetime``: then it
  is bounced as expired (4.4.7).

When nothing is pending, bounced recipients get one DSN (never for a null sender: no
bounce of a bounce) and the message is removed.  The admin methods ``flush``, ``hold``,
``release``, ``delete`` and ``bounce`` are the seam for the queue CLI.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gateway import maillog
from gateway.config import QueueSection
from gateway.delivery import AttemptResult, Outcome, RecipientResult, Relay
from gateway.dsn import build_bounce
from gateway.envelope import Envelope
from gateway.queuestate import BOUNCED, DELIVERED, PENDING, QueueState
from gateway.sendrate import SendRate, Unlimited
from gateway.spool import CorruptMessage, NoSuchMessage, Spool

log = Logger(namespace="gateway.scheduler")


class OutboundGate(Protocol):
    """The shared cap toward the smarthosts (``ratelimit.RateLimiter``): asked before each
    relay call; a refusal reschedules the message after ``retry_after`` (no attempt)."""

    def outbound(self) -> Deferred[Any]: ...

JITTER = 0.2
RESTART_SPREAD = 30.0  # overdue messages found at start are spread over this many seconds
FRESH_BUDGET = 32 * 1024 * 1024  # bytes of just-accepted messages kept for their first attempt
STOP_TIMEOUT = 10.0  # stopService cancels attempts still running after this long


class Scheduler(service.Service):
    name = "scheduler"

    def __init__(self, spool: Spool, relay: Relay, queue_cfg: QueueSection, hostname: str,
                 clock: IReactorTime, rng: random.Random | None = None,
                 send_rate: SendRate | None = None,
                 outbound: OutboundGate | None = None) -> None:
        self.spool = spool
        self.send_rate = send_rate or Unlimited()  # a permit per attempt (gateway.sendrate)
        self.relay = relay
        self.cfg = queue_cfg
        self.hostname = hostname
        self.clock = clock
        self.rng = rng or random.Random()
        self.outbound = outbound
        self.ready: Deferred[None] = Deferred()  # fires once the spool has been loaded
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}  # qid -> due time; heap entries that disagree are stale
        self._seq = 0
        self._in_flight: dict[str, Deferred[None]] = {}
        self._relaying: dict[str, Deferred[AttemptResult]] = {}
        self._blocked: set[str] = set()  # held, or being changed by an admin: never scheduled
        self._wakeup: IDelayedCall | None = None
        self._fresh: dict[str, tuple[Envelope, bytes]] = {}  # accepted, not yet attempted
        self._fresh_bytes = 0

    # --- lifecycle ----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._pump()  # mail enqueued before the start
        loaded = ensureDeferred(self._load())
        if self.ready.called:
            self.ready = loaded
        else:
            loaded.chainDeferred(self.ready)

    async def _load(self) -> None:
        try:
            qids = await self.spool.scan()
        except Exception:
            log.failure("scanning the spool failed; only new mail will be delivered")
            return
        now = self.clock.seconds()
        spread = min(RESTART_SPREAD, self.cfg.retry_min)
        for qid in qids:
            try:
                state = await self.spool.load_state(qid)
            except Exception:
                log.failure("{queue_id} loading state failed", queue_id=qid)
                state = None
            due = state.next_attempt if state else now
            if due <= now:
                due = now + self.rng.uniform(0, spread)
            if qid not in self._due and qid not in self._in_flight:
                self._schedule(qid, due)
        log.info("spool loaded: {count} messages queued", count=len(qids))
        self._pump()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._fresh.clear()
        self._fresh_bytes = 0
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if not self._in_flight:
            return succeed(None)
        timer = self.clock.callLater(STOP_TIMEOUT, self._cancel_all)

        def stopped(_: object) -> None:
            if timer.active():
                timer.cancel()

        return self.settle().addCallback(stopped)

    def _cancel_all(self) -> None:
        for qid, d in list(self._relaying.items()):
            log.warn("{queue_id} attempt cancelled at shutdown; it stays queued", queue_id=qid)
            d.cancel()

    def settle(self) -> Deferred[None]:
        """Fires when no attempt is in flight (attempts started meanwhile included)."""
        async def wait() -> None:
            while self._in_flight:
                await DeferredList([_observe(d) for d in self._in_flight.values()])
        return ensureDeferred(wait())

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    # --- scheduling ---------------------------------------------------------------------
    def enqueue(self, envelope: Envelope, message: bytes | None = None) -> None:
        """A message just accepted into the spool: deliver it as soon as a slot is free.

        With ``message`` (the bytes just written), the first attempt uses them instead of
        reading the spool back, within a bounded memory budget."""
        qid = envelope.queue_id
        if message is not None and self._fresh_bytes + len(message) <= FRESH_BUDGET:
            self._fresh[qid] = (envelope, message)
            self._fresh_bytes += len(message)
        self._schedule(qid, self.clock.seconds())

    def _take_fresh(self, qid: str) -> tuple[Envelope, bytes] | None:
        fresh = self._fresh.pop(qid, None)
        if fresh is not None:
            self._fresh_bytes -= len(fresh[1])
        return fresh

    def _schedule(self, qid: str, when: float) -> None:
        if qid in self._blocked:
            return
        self._due[qid] = when
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, qid))
        self._pump()

    def _pump(self) -> None:
        """Start every due attempt a free slot allows, then arm the wakeup for the next."""
        if not self.running:
            return
        now = self.clock.seconds()
        while self._heap and len(self._in_flight) < self.cfg.concurrency:
            when, _, qid = self._heap[0]
            if self._due.get(qid) != when:
                heapq.heappop(self._heap)  # stale entry
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._due[qid]
            if qid not in self._in_flight:  # else the end of that attempt reschedules it
                self._start(qid)
        self._arm(now)

    def _arm(self, now: float) -> None:
        """Keep exactly one DelayedCall, for the earliest due message (none when full)."""
        want = self._heap[0][0] if self._heap and len(self._in_flight) < self.cfg.concurrency \
            else None
        if self._wakeup is not None and self._wakeup.active():
            if want is not None and self._wakeup.getTime() == max(want, now):
                return
            self._wakeup.cancel()
        self._wakeup = None
        if want is not None:
            self._wakeup = self.clock.callLater(max(0.0, want - now), self._wake)

    def _wake(self) -> None:
        self._wakeup = None
        self._pump()

    def _start(self, qid: str) -> None:
        d = ensureDeferred(self._attempt(qid))
        self._in_flight[qid] = d

        def done(next_due: float | None) -> None:
            del self._in_flight[qid]
            if next_due is None:
                self._due.pop(qid, None)
            else:
                self._schedule(qid, next_due)
            self._pump()

        d.addCallback(done)

    def _retry_delay(self, attempts: int) -> float:
        delay = min(self.cfg.retry_min * 2 ** max(attempts - 1, 0), self.cfg.retry_max)
        return delay * self.rng.uniform(1 - JITTER, 1 + JITTER)

    # --- one attempt --------------------------------------------------------------------
    async def _attempt(self, qid: str) -> float | None:
        """One delivery attempt; returns when the next is due, None when it is finished."""
        fresh = self._take_fresh(qid)
        try:
            envelope, message = fresh if fresh is not None else await self.spool.read(qid)
        except NoSuchMessage:
            log.info("{queue_id} is no longer in the queue", queue_id=qid)
            return None
        except CorruptMessage as e:
            maillog.removed(qid, f"corrupt queue file moved aside ({e})")
            return None
        except Exception:
            log.failure("{queue_id} reading the message failed", queue_id=qid)
            return self.clock.seconds() + self.cfg.retry_min
        try:
            return await self._deliver(envelope, message, fresh=fresh is not None)
        except Exception:
            log.failure("{queue_id} attempt failed", queue_id=qid)
            return self.clock.seconds() + self.cfg.retry_min

    async def _deliver(self, envelope: Envelope, message: bytes, *,
                       fresh: bool = False) -> float | None:
        qid = envelope.queue_id
        # A message just accepted has no state on disk yet: no need to look.
        state = (None if fresh else await self.spool.load_state(qid)) or QueueState.new(envelope)
        pending = state.pending()
        if pending:
            if not self.running:
                return self.clock.seconds()  # stopping: start no new relay call
            # The cross-node cap (ratelimit) first, then the node-local send rate (sendrate).
            permit = await self.outbound.outbound() if self.outbound is not None else None
            if permit is not None and not permit.granted:
                # Over the shared outbound cap: not an attempt, just a little later.
                return self.clock.seconds() + permit.retry_after * self.rng.uniform(1, 1.5)
            d = self._relay(replace(envelope, recipients=tuple(pending)), message)
            self._relaying[qid] = d
            try:
                result = await d
            except CancelledError:
                return self.clock.seconds()  # stopping: nothing recorded, still pending
            except Exception as e:
                result = AttemptResult("", tuple(RecipientResult(
                    r, Outcome.TEMPFAIL, 0, "", f"internal error: {e!r}") for r in pending))
            finally:
                del self._relaying[qid]
                if permit is not None:
                    permit.release()
            now = self.clock.seconds()
            outcomes = self._record(envelope, state, result, pending, now)
            if state.pending() or state.bounced():
                await self.spool.save_state(state)  # persisted before anything else happens
            # else: all delivered, and the message is removed next; a crash before that can
            # only deliver it again (at least once), so the state write would buy nothing.
            self._log(envelope, outcomes, state.next_attempt, now)
            if state.pending():
                return state.next_attempt
            if not state.bounced():
                await self.spool.remove(qid, durable=False)
                maillog.removed(qid, "delivered")
                return None
        await self._finish(envelope, message, state)
        return None

    def _relay(self, envelope: Envelope, message: bytes) -> Deferred[AttemptResult]:
        """A send-rate permit, then the relay; cancelling stops whichever is running."""
        async def run() -> AttemptResult:
            await self.send_rate.acquire()
            return await self.relay.deliver(envelope, message)
        return ensureDeferred(run())

    def _record(self, envelope: Envelope, state: QueueState, result: AttemptResult,
                pending: list[str], now: float) -> list[tuple[RecipientResult, str]]:
        """Apply one attempt's results to ``state``; returns (result, new status) pairs."""
        state.begin_attempt(now)
        by_rcpt = {r.recipient: r for r in result.results}
        expired = now - envelope.received_at >= self.cfg.max_lifetime
        outcomes = []
        for rcpt in pending:
            r = by_rcpt.get(rcpt) or RecipientResult(
                rcpt, Outcome.TEMPFAIL, 0, "", "no result from the relay", result.host)
            if r.outcome is Outcome.DELIVERED:
                status = DELIVERED
            elif r.outcome is Outcome.PERMFAIL or expired:
                status = BOUNCED
            else:
                status = PENDING
            state.record(r, status, now, expired=expired and r.outcome is Outcome.TEMPFAIL)
            outcomes.append((r, status))
        # The last retry is due when the message expires, so an expiry bounce is timely.
        expires = envelope.received_at + self.cfg.max_lifetime
        state.next_attempt = min(now + self._retry_delay(state.attempts), max(expires, now))
        return outcomes

    def _log(self, envelope: Envelope, outcomes: list[tuple[RecipientResult, str]],
             next_attempt: float, now: float) -> None:
        qid = envelope.queue_id
        for r, status in outcomes:
            reply = r.describe()  # the relay logged each host's attempt already
            if status == DELIVERED:
                maillog.delivered(qid, r.recipient, r.host, reply, now - envelope.received_at)
            elif status == PENDING:
                maillog.deferred(qid, r.recipient, r.host, reply, next_attempt - now)

    async def _finish(self, envelope: Envelope, message: bytes, state: QueueState) -> None:
        """Nothing is pending: bounce what failed, then forget the message."""
        qid = envelope.queue_id
        bounced = state.bounced()
        dsn_id = None
        if bounced and envelope.sender:
            dsn_id = await self._send_bounce(envelope, message, state)
        for r in bounced:
            maillog.bounced(qid, r.recipient, r.host, r.result().describe(), dsn_id)
        if bounced and not envelope.sender:
            log.warn("{queue_id} failed mail from the null sender: no bounce of a bounce",
                     queue_id=qid)
        await self.spool.remove(qid)
        maillog.removed(qid, "bounced" if bounced else "delivered")

    async def _send_bounce(self, envelope: Envelope, message: bytes, state: QueueState) -> str:
        now = self.clock.seconds()
        bounced = state.bounced()
        dsn = build_bounce(envelope, message, [r.result() for r in bounced],
                           reporting_mta=self.hostname, now=now,
                           expired=any(r.expired for r in bounced))
        dsn_env = Envelope(queue_id=self.spool.new_id(now), sender="", recipients=(envelope.sender,),
                           received_at=now, listener="bounce", size=len(dsn),
                           extra={"bounce_of": envelope.queue_id})
        await self.spool.submit(dsn_env, dsn)  # if this fails, the original stays queued
        maillog.queued(dsn_env.queue_id, "-", "", 1, len(dsn), None)
        self.enqueue(dsn_env)
        return dsn_env.queue_id

    # --- admin --------------------------------------------------------------------------
    def flush(self, ids: list[str] | None = None) -> list[str]:
        """Make the given (default: all scheduled) messages due now; returns their ids."""
        now = self.clock.seconds()
        targets = list(self._due) if ids is None else [q for q in ids if q in self._due]
        for qid in targets:
            if qid not in self._in_flight:
                self._schedule(qid, now)
        return targets

    async def _exclusive(self, qid: str, action: Callable[[], Awaitable[None]], *,
                         keep_blocked: bool = False) -> None:
        """Run an admin ``action`` on ``qid`` with its scheduling suspended: no new attempt
        starts, and one in flight is waited for.  If the action fails, a message the
        scheduler was managing is scheduled again."""
        active = qid in self._due or qid in self._in_flight
        self._blocked.add(qid)
        self._take_fresh(qid)
        self._due.pop(qid, None)
        try:
            if qid in self._in_flight:
                await _observe(self._in_flight[qid])
            await action()
        except BaseException:
            self._blocked.discard(qid)
            if active:
                self._schedule(qid, self.clock.seconds() + self.cfg.retry_min)
            raise
        if not keep_blocked:
            self._blocked.discard(qid)

    def hold(self, qid: str) -> Deferred[None]:
        """Park a message in hold/ until released (an attempt in flight finishes first)."""
        return ensureDeferred(self._exclusive(qid, lambda: self.spool.hold(qid),
                                              keep_blocked=True))

    def release(self, qid: str) -> Deferred[None]:
        """Move a held message back to the queue, due now."""
        async def run() -> None:
            await self.spool.release(qid)
            self._blocked.discard(qid)
            self._schedule(qid, self.clock.seconds())
        return ensureDeferred(run())

    def delete(self, qid: str) -> Deferred[None]:
        """Remove a message (queued or held) without delivering or bouncing it."""
        async def run() -> None:
            await self.spool.remove(qid)
            maillog.removed(qid, "deleted by the administrator")
        return ensureDeferred(self._exclusive(qid, run))

    def bounce(self, qid: str) -> Deferred[None]:
        """Fail every pending recipient of a message (queued or held) and send the bounce."""
        async def run() -> None:
            envelope, message = await self.spool.read(qid)
            state = await self.spool.load_state(qid) or QueueState.new(envelope)
            now = self.clock.seconds()
            for rcpt in state.pending():
                state.record(RecipientResult(rcpt, Outcome.PERMFAIL, 0, "5.0.0",
                                             "bounced by the administrator"), BOUNCED, now)
            await self.spool.save_state(state)
            await self._finish(envelope, message, state)
        return ensureDeferred(self._exclusive(qid, run))


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires with None when ``d`` fires, leaving ``d``'s result alone."""
    obs: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        obs.callback(None)
        return result

    d.addBoth(fire)
    return obs
