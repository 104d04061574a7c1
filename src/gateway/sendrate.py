"""The outbound message-rate cap: how many messages per second leave toward the smarthost.

The scheduler asks for a permit before each delivery attempt (``SendRate.acquire``), so
another implementation (a cross-node cap kept in Redis) can replace the node-local one
here without touching the relay.  The local one is a token bucket with a burst of one
second's worth of messages; permits are handed out in the order they were asked for.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class SendRate(Protocol):
    def acquire(self) -> defer.Deferred[None]:
        """Fires when one more message may be sent.  Cancellable."""


class Unlimited:
    """No cap (``relay.messages_per_second = 0``)."""

    def acquire(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class LocalSendRate:
    """A token bucket on this node: ``rate`` messages per second, bursts of ``burst``."""

    def __init__(self, rate: float, clock: IReactorTime, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (use Unlimited for no cap)")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock.seconds()
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._call: IDelayedCall | None = None

    def acquire(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred(self._cancelled)
        self._waiters.append(d)
        self._serve()
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def _serve(self) -> None:
        self._refill()
        while self._waiters and self._tokens >= 1.0:
            self._tokens -= 1.0
            self._waiters.popleft().callback(None)
        if self._waiters and (self._call is None or not self._call.active()):
            self._call = self.clock.callLater((1.0 - self._tokens) / self.rate, self._tick)

    def _tick(self) -> None:
        self._call = None
        self._serve()

    def _cancelled(self, d: defer.Deferred[None]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)
        if not self._waiters and self._call is not None and self._call.active():
            self._call.cancel()
            self._call = None


def send_rate(messages_per_second: float, clock: IReactorTime) -> SendRate:
    """The node-local cap for ``relay.messages_per_second`` (0: none)."""
    if messages_per_second <= 0:
        return Unlimited()
    return LocalSendRate(messages_per_second, clock)
