"""The in-process ``LimitStore``: the same algorithms as the Redis scripts, on this node only.

Used when no Redis is configured (the embedded default), and as the fallback while Redis
is unreachable with ``fail_mode = "fail_open"``.  Time comes from the injected clock.
Memory stays bounded: a GCRA bucket whose time has passed is dropped (it means "empty"),
lease sets drop expired holders, and each table keeps at most ``max_entries`` keys, the
least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway.ratelimit import LEASE_TTL, Bucket, RateAnswer, Slot


def gcra(tat: float, now: float, bucket: Bucket) -> tuple[float, float]:
    """(new theoretical arrival time, seconds to wait); wait > 0 means refused."""
    interval = bucket.window / bucket.limit
    new = max(tat, now) + interval * bucket.cost
    return new, new - now - bucket.window


class LocalStore:
    def __init__(self, clock: IReactorTime, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.clock = clock
        self.max_entries = max_entries
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._leases: dict[str, dict[str, float]] = {}
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def take(self, buckets: Sequence[Bucket]) -> Deferred[RateAnswer]:
        return defer.succeed(self.take_now(buckets))

    def take_now(self, buckets: Sequence[Bucket]) -> RateAnswer:
        now = self.clock.seconds()
        new_tats, worst, worst_i = [], 0.0, None
        for i, bucket in enumerate(buckets):
            new, wait = gcra(self._tats.get(bucket.name, now), now, bucket)
            if wait > 1e-9 and wait > worst:
                worst, worst_i = wait, i
            new_tats.append(new)
        if worst_i is not None:
            return RateAnswer(worst_i, worst)
        for bucket, new in zip(buckets, new_tats, strict=True):
            self._tats.pop(bucket.name, None)
            self._tats[bucket.name] = new
        self._trim_tats(now)
        return RateAnswer()

    def _trim_tats(self, now: float) -> None:
        while len(self._tats) > self.max_entries:
            self._tats.popitem(last=False)
        # Entries are in order of last charge; a passed TAT is an empty bucket.
        while self._tats:
            name, tat = next(iter(self._tats.items()))
            if tat > now:
                break
            del self._tats[name]

    def acquire(self, slots: Sequence[Slot], holder: str) -> Deferred[RateAnswer]:
        return defer.succeed(self.acquire_now(slots, holder))

    def acquire_now(self, slots: Sequence[Slot], holder: str) -> RateAnswer:
        now = self.clock.seconds()
        for i, slot in enumerate(slots):
            holders = self._leases.get(slot.name, {})
            for h in [h for h, expiry in holders.items() if expiry <= now]:
                del holders[h]
            if holder not in holders and len(holders) >= slot.limit:
                return RateAnswer(i, 1.0)
        for slot in slots:
            self._leases.setdefault(slot.name, {})[holder] = now + LEASE_TTL
        return RateAnswer()

    def release(self, slots: Sequence[Slot], holder: str) -> Deferred[None]:
        for slot in slots:
            holders = self._leases.get(slot.name)
            if holders is not None:
                holders.pop(holder, None)
                if not holders:
                    del self._leases[slot.name]
        return defer.succeed(None)

    def holds(self, holder: str) -> bool:
        return any(holder in holders for holders in self._leases.values())

    def refresh(self, leases: Sequence[tuple[Sequence[Slot], str]]) -> Deferred[None]:
        expiry = self.clock.seconds() + LEASE_TTL
        for slots, holder in leases:
            for slot in slots:
                holders = self._leases.get(slot.name)
                if holders is not None and holder in holders:
                    holders[holder] = expiry
        return defer.succeed(None)

    def add_failure(self, name: str, window: float, keep: int) -> Deferred[int]:
        now = self.clock.seconds()
        self._expire_failures(now, window)
        times = self._failures.pop(name, None)
        if times is None or times.maxlen != keep:
            times = deque(times or (), maxlen=keep)
        times.append(now)
        self._failures[name] = times
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)
        return defer.succeed(sum(1 for t in times if t > now - window))

    def count_failures(self, name: str, window: float) -> Deferred[int]:
        now = self.clock.seconds()
        times = self._failures.get(name, ())
        return defer.succeed(sum(1 for t in times if t > now - window))

    def failure_entries(self) -> int:
        return len(self._failures)

    def _expire_failures(self, now: float, window: float) -> None:
        # Ordered by last failure, so stale entries sit at the front.
        while self._failures:
            name, times = next(iter(self._failures.items()))
            if times[-1] > now - window:
                break
            del self._failures[name]
