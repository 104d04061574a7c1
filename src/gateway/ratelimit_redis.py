"""The shared ``LimitStore``: Redis through txredisapi, one atomic Lua script per check.

**Time** is Redis's own clock (``TIME`` inside each script), never the gateway's: every
node charges the same buckets against the same clock, so skew between the nodes cannot
stretch or shrink a window.  (Scripts that call ``TIME`` need effect replication, the
default since Redis 5.)  GCRA times are whole microseconds, exact in Lua's doubles.

**No session ever hangs on Redis** (twisted-notes §5: txredisapi waits forever while
Redis is down): every call carries ``deadline``.  The first failure marks Redis down;
from then on no call goes to Redis (so nobody waits for the deadline again) and a probe
``PING``s every ``PROBE_INTERVAL`` seconds until Redis answers, then the shared limits
are back, with a log line each way.  While down, ``fail_open`` answers from the
in-process store with the same rules (each node then enforces the limits alone);
``fail_closed`` fails with ``LimiterUnavailable`` (451 4.7.1 / 421 4.7.0).

The pool is opened without ``SELECT`` when the database is 0, because a failed
``SELECT``/``AUTH`` during a reconnect stops txredisapi reconnecting for good (§5 again).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.config import RateLimitSection
from gateway.ratelimit import LEASE_TTL, Bucket, LimiterUnavailable, RateAnswer, Slot
from gateway.ratelimit_local import LocalStore

log = Logger(namespace="gateway.ratelimit.redis")

PROBE_INTERVAL = 1.0
T = TypeVar("T")

# KEYS: buckets.  ARGV: interval_us, window_us, cost per bucket.  All or nothing.
# Returns {0, 0} when charged, {i, wait_us} when bucket i refused (the longest wait).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats, worst, worst_i = {}, 0, 0
for i = 1, #KEYS do
  local interval, window, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = math.floor(tat + interval * cost + 0.5)
  local wait = new - now - window
  if wait > 0 and wait > worst then worst, worst_i = wait, i end
  tats[i] = new
end
if worst_i > 0 then return {worst_i, math.floor(worst)} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX',
             math.floor((tats[i] - now) / 1000) + 1)
end
return {0, 0}
"""

# KEYS: lease sets.  ARGV: holder, ttl_ms, then one limit per key.  All or nothing.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder, ttl = ARGV[1], tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if not redis.call('ZSCORE', KEYS[i], holder) and
     redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then
    return i
  end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + ttl, holder)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return 0
"""

# KEYS: lease sets.  ARGV: ttl_ms (0: release), then one holder per key.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  if ttl == 0 then
    redis.call('ZREM', KEYS[i], ARGV[1 + i])
  else
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[1 + i])
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 0
"""

# KEYS[1]: failure log.  ARGV: window_us, keep, member ("" to only count).
FAILURE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[1], math.floor(window / 1000) + 1)
end
return redis.call('ZCARD', KEYS[1])
"""


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """``redis://host[:port][/db]`` → (host, port, db); the config validated it already."""
    parts = urlsplit(url)
    db = parts.path.strip("/")
    return parts.hostname or "127.0.0.1", parts.port or 6379, int(db) if db else 0


def connect(section: RateLimitSection, deadline: float) -> Any:
    """A lazy txredisapi pool: returns at once, (re)connects in the background."""
    assert section.redis is not None
    host, port, db = parse_redis_url(section.redis)
    return txredisapi.lazyConnectionPool(
        host=host, port=port, dbid=db or None, poolsize=4, reconnect=True,
        password=section.redis_password, connectTimeout=max(deadline, 1.0),
        replyTimeout=max(deadline, 1.0))


class RedisStore:
    """``LimitStore`` over Redis, with the health switch and the fallback described above."""

    def __init__(self, section: RateLimitSection, clock: IReactorTime, fallback: LocalStore,
                 pool: Any = None) -> None:
        self.prefix = section.prefix
        self.deadline = section.deadline
        self.fail_open = section.fail_mode == "fail_open"
        self.clock = clock
        self.fallback = fallback
        self.redis = pool if pool is not None else connect(section, section.deadline)
        self.up = True
        self.stats = {"redis_calls": 0, "redis_errors": 0, "fallback_calls": 0}
        self._local_holders: set[str] = set()
        self._probe = LoopingCall(self._ping)
        self._probe.clock = clock
        self._seq = 0
        self._member = os.urandom(4).hex()

    # --- LimitStore ---------------------------------------------------------------------
    def take(self, buckets: Sequence[Bucket]) -> Deferred[RateAnswer]:
        keys = [self.prefix + b.name for b in buckets]
        args: list[Any] = []
        for b in buckets:
            args += [f"{b.window * 1e6 / b.limit:.6f}", int(b.window * 1e6), f"{b.cost:g}"]

        async def shared() -> RateAnswer:
            index, wait_us = await self._eval(GCRA_SCRIPT, keys, args)
            return RateAnswer(index - 1, wait_us / 1e6) if index else RateAnswer()

        return self._call(shared, lambda: self.fallback.take(buckets))

    def acquire(self, slots: Sequence[Slot], holder: str) -> Deferred[RateAnswer]:
        keys = [self.prefix + s.name for s in slots]
        args = [holder, int(LEASE_TTL * 1000), *(s.limit for s in slots)]

        async def shared() -> RateAnswer:
            index = await self._eval(ACQUIRE_SCRIPT, keys, args)
            return RateAnswer(index - 1, 1.0) if index else RateAnswer()

        def local() -> Deferred[RateAnswer]:
            d = self.fallback.acquire(slots, holder)

            def remember(answer: RateAnswer) -> RateAnswer:
                if answer.refused is None:
                    self._local_holders.add(holder)
                return answer
            return d.addCallback(remember)

        return self._call(shared, local)

    def release(self, slots: Sequence[Slot], holder: str) -> Deferred[None]:
        if holder in self._local_holders:
            self._local_holders.discard(holder)
            return self.fallback.release(slots, holder)
        return self._leases([(slots, holder)], 0)

    def refresh(self, leases: Sequence[tuple[Sequence[Slot], str]]) -> Deferred[None]:
        local = [lease for lease in leases if lease[1] in self._local_holders]
        self.fallback.refresh(local)
        shared = [lease for lease in leases if lease[1] not in self._local_holders]
        return self._leases(shared, int(LEASE_TTL * 1000)) if shared else defer.succeed(None)

    def _leases(self, leases: Sequence[tuple[Sequence[Slot], str]], ttl_ms: int) -> Deferred[None]:
        keys = [self.prefix + s.name for slots, _ in leases for s in slots]
        holders = [h for slots, h in leases for _ in slots]
        if not self.up or not keys:
            return defer.succeed(None)  # a lease on a Redis we cannot reach expires there
        d = self._deadline(self.redis.eval(LEASE_SCRIPT, keys, [ttl_ms, *holders]))
        return d.addCallback(lambda _: None).addErrback(self._failed)

    def add_failure(self, name: str, window: float, keep: int) -> Deferred[int]:
        self._seq += 1
        member = f"{self._member}:{self._seq}"
        return self._call(
            lambda: self._eval(FAILURE_SCRIPT, [self.prefix + name], [int(window * 1e6), keep,
                                                                      member]),
            lambda: self.fallback.add_failure(name, window, keep))

    def count_failures(self, name: str, window: float) -> Deferred[int]:
        return self._call(
            lambda: self._eval(FAILURE_SCRIPT, [self.prefix + name], [int(window * 1e6), 0, ""]),
            lambda: self.fallback.count_failures(name, window))

    def stop(self) -> Deferred[None]:
        if self._probe.running:
            self._probe.stop()
        d = defer.maybeDeferred(self.redis.disconnect)
        return d.addErrback(lambda _: None)

    # --- health -------------------------------------------------------------------------
    def _call(self, shared: Callable[[], Awaitable[T]],
              local: Callable[[], Deferred[T]]) -> Deferred[T]:
        if not self.up:
            return self._degraded(local)

        async def attempt() -> T:
            try:
                return await shared()
            except Exception as e:
                self._failed(e)
                return await self._degraded(local)

        return defer.ensureDeferred(attempt())

    def _degraded(self, local: Callable[[], Deferred[T]]) -> Deferred[T]:
        if self.fail_open:
            self.stats["fallback_calls"] += 1
            return local()
        return defer.fail(LimiterUnavailable("redis unavailable"))

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self.stats["redis_calls"] += 1
        return await self._deadline(self.redis.eval(script, keys, args))

    def _deadline(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(self.deadline, self.clock)

    def _failed(self, error: Any) -> None:
        self.stats["redis_errors"] += 1
        if not self.up:
            return
        self.up = False
        text = error.getErrorMessage() if hasattr(error, "getErrorMessage") else repr(error)
        mode = ("fail_open: using the in-process limiter on this node"
                if self.fail_open else "fail_closed: refusing with 451 4.7.1")
        log.error("redis unavailable ({error}); rate limits are not shared, {mode}",
                  error=text[:200], mode=mode)
        if not self._probe.running:
            self._probe.start(PROBE_INTERVAL, now=False)

    def _ping(self) -> Deferred[None]:
        d = self._deadline(self.redis.ping())

        def back(_: object) -> None:
            if self.up:
                return
            self.up = True
            if self._probe.running:
                self._probe.stop()
            log.info("redis available again; rate limits are shared across nodes again")

        return d.addCallbacks(back, lambda _: None)
