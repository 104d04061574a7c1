"""A pool of persistent connections, keyed by destination; it knows nothing about SMTP.

The relay borrows a connection for one message and gives it back; the pool decides
whether it is kept for the next message or closed.  What a connection *is* is the
caller's business, told through a ``Connector``: how to create one, whether one is
still usable, and how to close it.  Limits (per key):

- ``max_connections``: connections open at once (idle + borrowed).  A borrower over the
  cap waits, first come first served, until one is given back or closed;
- ``max_uses``: messages per connection; after the last, ``release`` closes it;
- ``idle_timeout``: an idle connection is closed after this long (set it below the
  server's own idle timeout, so the server never drops a connection we think is good);
- ``max_age``: a connection older than this is closed when it is given back.

The newest idle connection is lent first (LIFO): the others age out under light load.
A lease must end with exactly one of ``release(reusable=...)`` or ``discard()``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

C = TypeVar("C")


class Connector(Protocol[C]):
    """How the pool handles one kind of connection."""

    def create(self, key: Hashable) -> defer.Deferred[C]:
        """A new connection to ``key``, ready for use (errbacks when it cannot be made)."""

    def usable(self, conn: C) -> bool:
        """Still open, nothing pending: fit to be lent again."""

    def close(self, conn: C) -> None:
        """Close politely in the background (never raises, never blocks)."""


@dataclass(frozen=True)
class PoolLimits:
    max_connections: int = 10
    max_uses: int = 100
    idle_timeout: float = 30.0
    max_age: float = 600.0


@dataclass(eq=False)
class Lease(Generic[C]):
    """One borrowed connection.  ``reused`` is True when it served a message before."""

    key: Hashable
    conn: C
    created: float
    uses: int = 0  # messages started on it, this one included
    idle_since: float = 0.0
    _idle_call: IDelayedCall | None = field(default=None, repr=False)
    _done: bool = False

    @property
    def reused(self) -> bool:
        return self.uses > 1


@dataclass
class _Slot(Generic[C]):
    idle: list[Lease[C]] = field(default_factory=list)
    open: int = 0  # connections counted against the cap (idle, lent, being created)
    waiters: deque[defer.Deferred[None]] = field(default_factory=deque)


class ConnectionPool(Generic[C]):
    """Persistent connections per key; see the module docstring."""

    def __init__(self, connector: Connector[C], limits: PoolLimits, clock: IReactorTime) -> None:
        self.connector = connector
        self.limits = limits
        self.clock = clock
        self._slots: dict[Hashable, _Slot[C]] = {}
        self.created = 0  # connections ever created (for tests and benchmarks)
        self._closed = False

    # --- borrowing ----------------------------------------------------------------------
    async def acquire(self, key: Hashable) -> Lease[C]:
        """An idle connection to ``key`` if one is usable, else a new one (waiting while
        ``key`` is at its cap).  Errbacks with whatever ``Connector.create`` failed with."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        slot = self._slots.setdefault(key, _Slot())
        while True:
            lease = self._take_idle(slot)
            if lease is not None:
                lease.uses += 1
                return lease
            if slot.open < self.limits.max_connections:
                break
            waiter: defer.Deferred[None] = defer.Deferred()
            slot.waiters.append(waiter)
            try:
                await waiter
            except defer.CancelledError:
                if waiter in slot.waiters:
                    slot.waiters.remove(waiter)
                raise
        slot.open += 1
        try:
            conn = await self.connector.create(key)
        except BaseException:
            self._forget(slot)
            raise
        self.created += 1
        return Lease(key, conn, self.clock.seconds(), uses=1)

    def _take_idle(self, slot: _Slot[C]) -> Lease[C] | None:
        while slot.idle:
            lease = slot.idle.pop()
            self._cancel_idle_call(lease)
            if self.connector.usable(lease.conn):
                lease._done = False
                return lease
            self._close(slot, lease)
        return None

    def release(self, lease: Lease[C], *, reusable: bool = True) -> None:
        """Give a connection back: kept idle when ``reusable`` and within the limits,
        closed otherwise."""
        if lease._done:
            return
        lease._done = True
        slot = self._slots[lease.key]
        now = self.clock.seconds()
        keep = (reusable and not self._closed and lease.uses < self.limits.max_uses
                and now - lease.created < self.limits.max_age
                and self.connector.usable(lease.conn))
        if not keep:
            self._close(slot, lease)
            return
        lease.idle_since = now
        lease._idle_call = self.clock.callLater(self.limits.idle_timeout, self._idle_expired,
                                                lease)
        slot.idle.append(lease)
        self._wake(slot)

    def discard(self, lease: Lease[C]) -> None:
        """The connection is broken or in an unknown state: close it, never reuse it."""
        self.release(lease, reusable=False)

    # --- inspection and shutdown ----------------------------------------------------------
    def open_connections(self, key: Hashable | None = None) -> int:
        if key is not None:
            slot = self._slots.get(key)
            return slot.open if slot else 0
        return sum(slot.open for slot in self._slots.values())

    def idle_connections(self, key: Hashable | None = None) -> int:
        slots = [self._slots[key]] if key in self._slots else [] if key is not None \
            else list(self._slots.values())
        return sum(len(slot.idle) for slot in slots)

    def close_idle(self, key: Hashable | None = None) -> None:
        """Close the idle connections (of ``key``, or all)."""
        for k, slot in list(self._slots.items()):
            if key is None or k == key:
                while slot.idle:
                    lease = slot.idle.pop()
                    self._cancel_idle_call(lease)
                    self._close(slot, lease)

    def close(self) -> None:
        """Stop lending: close every idle connection now and every lent one on release."""
        self._closed = True
        self.close_idle()
        for slot in self._slots.values():
            while slot.waiters:
                slot.waiters.popleft().errback(RuntimeError("the connection pool is closed"))

    # --- internals ------------------------------------------------------------------------
    def _idle_expired(self, lease: Lease[C]) -> None:
        lease._idle_call = None
        slot = self._slots.get(lease.key)
        if slot is not None and lease in slot.idle:
            slot.idle.remove(lease)
            self._close(slot, lease)

    def _close(self, slot: _Slot[C], lease: Lease[C]) -> None:
        self._cancel_idle_call(lease)
        try:
            self.connector.close(lease.conn)
        finally:
            self._forget(slot)

    def _forget(self, slot: _Slot[C]) -> None:
        slot.open -= 1
        self._wake(slot)

    @staticmethod
    def _wake(slot: _Slot[Any]) -> None:
        if slot.waiters:
            slot.waiters.popleft().callback(None)

    @staticmethod
    def _cancel_idle_call(lease: Lease[Any]) -> None:
        if lease._idle_call is not None and lease._idle_call.active():
            lease._idle_call.cancel()
        lease._idle_call = None
