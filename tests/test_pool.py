"""gateway.pool, gateway.breaker and gateway.sendrate in memory, with task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from gateway.breaker import CircuitBreaker, State, route
from gateway.pool import ConnectionPool, PoolLimits
from gateway.sendrate import LocalSendRate, Unlimited, send_rate


class Conn:
    def __init__(self, n: int) -> None:
        self.n, self.open = n, True


class FakeConnector:
    def __init__(self) -> None:
        self.made: list[Conn] = []
        self.closed: list[Conn] = []
        self.fail: Exception | None = None
        self.pending: list[defer.Deferred] = []
        self.manual = False

    def create(self, key):
        if self.fail is not None:
            return defer.fail(self.fail)
        conn = Conn(len(self.made))
        self.made.append(conn)
        if self.manual:
            d = defer.Deferred()
            self.pending.append((d, conn))
            return d
        return defer.succeed(conn)

    def usable(self, conn):
        return conn.open

    def close(self, conn):
        conn.open = False
        self.closed.append(conn)


def make(**limits):
    clock = task.Clock()
    connector = FakeConnector()
    return ConnectionPool(connector, PoolLimits(**limits), clock), connector, clock


def acquire(pool, key="h"):
    return defer.ensureDeferred(pool.acquire(key))


def test_reuses_one_connection_and_counts_uses():
    pool, conn, _ = make()
    seen = []
    for _ in range(5):
        lease = acquire(pool).result
        seen.append((lease.uses, lease.reused))
        pool.release(lease)
    assert len(conn.made) == 1 and pool.created == 1
    assert seen == [(1, False), (2, True), (3, True), (4, True), (5, True)]


def test_max_uses_closes_after_the_last_message():
    pool, conn, _ = make(max_uses=2)
    for _ in range(5):
        pool.release(acquire(pool).result)
    assert len(conn.made) == 3 and len(conn.closed) == 2


def test_idle_timeout_closes_and_cancels():
    pool, conn, clock = make(idle_timeout=30)
    pool.release(acquire(pool).result)
    clock.advance(29)
    assert conn.closed == [] and pool.idle_connections("h") == 1
    clock.advance(1)
    assert conn.closed == conn.made and pool.open_connections() == 0
    assert clock.getDelayedCalls() == []


def test_max_age_closes_on_release():
    pool, conn, clock = make(max_age=100, idle_timeout=1000)
    lease = acquire(pool).result
    clock.advance(100)
    pool.release(lease)
    assert conn.closed == [lease.conn]


def test_unusable_idle_connection_is_replaced():
    pool, conn, _ = make()
    lease = acquire(pool).result
    pool.release(lease)
    lease.conn.open = False  # the server went away while it was idle
    second = acquire(pool).result
    assert second.conn is not lease.conn and not second.reused
    assert pool.open_connections("h") == 1


def test_discard_never_reuses():
    pool, conn, _ = make()
    lease = acquire(pool).result
    pool.discard(lease)
    pool.release(lease)  # a second end of the same lease is ignored
    assert conn.closed == [lease.conn] and pool.open_connections() == 0


def test_cap_per_key_makes_borrowers_wait_in_order():
    pool, conn, _ = make(max_connections=2)
    a, b = acquire(pool).result, acquire(pool).result
    c, d = acquire(pool), acquire(pool)
    assert not c.called and not d.called
    other = acquire(pool, "other")  # other keys are not affected
    assert other.called
    pool.release(a)
    assert c.result.conn is a.conn and not d.called
    pool.discard(b)
    assert d.called and d.result.conn is not b.conn
    assert len(conn.made) == 4  # h: a, b, then d's fresh one; plus "other"


def test_failed_create_frees_its_slot():
    pool, conn, _ = make(max_connections=1)
    conn.fail = ConnectionRefusedError("no")
    d = acquire(pool)
    assert isinstance(d.result.value, ConnectionRefusedError)
    d.addErrback(lambda f: None)
    conn.fail = None
    assert acquire(pool).called


def test_cancelled_waiter_leaves_the_queue():
    pool, _, _ = make(max_connections=1)
    a = acquire(pool).result
    waiting = acquire(pool)
    waiting.cancel()
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    pool.release(a)
    assert pool.idle_connections("h") == 1


def test_close_closes_idle_and_returned_connections():
    pool, conn, clock = make()
    a, b = acquire(pool).result, acquire(pool).result
    pool.release(a)
    pool.close()
    assert conn.closed == [a.conn]
    pool.release(b)
    assert conn.closed == [a.conn, b.conn] and clock.getDelayedCalls() == []
    refused = acquire(pool)
    assert isinstance(refused.result.value, RuntimeError)
    refused.addErrback(lambda f: None)


# --- breaker ---------------------------------------------------------------------------

def test_breaker_opens_half_opens_and_closes():
    clock = task.Clock()
    b = CircuitBreaker("h:1", failures=3, cooldown=30, clock=clock)
    b.failure(), b.failure()
    assert b.state is State.CLOSED and b.allow()
    b.failure()
    assert b.state is State.OPEN and not b.allow() and b.trips == 1
    clock.advance(30)
    assert b.state is State.HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()  # the probe failed: open for another cool-down
    assert b.state is State.OPEN and b.trips == 2
    clock.advance(30)
    assert b.allow()
    b.success()
    assert b.state is State.CLOSED and b.allow() and b.allow()


def test_success_resets_the_consecutive_count():
    b = CircuitBreaker("h", failures=2, cooldown=1, clock=task.Clock())
    b.failure(), b.success(), b.failure()
    assert b.state is State.CLOSED


def test_route_skips_open_hosts_and_forces_all_when_all_are_open():
    clock = task.Clock()
    bs = [CircuitBreaker(str(i), 1, 10, clock) for i in range(3)]
    assert route("abc", bs) == (list("abc"), False)
    bs[0].failure()
    assert route("abc", bs) == (list("bc"), False)
    bs[1].failure(), bs[2].failure()
    assert route("abc", bs) == (list("abc"), True)
    clock.advance(10)  # half-open again: a candidate (allow() admits one probe)
    assert route("abc", bs) == (list("abc"), False)


# --- send rate -------------------------------------------------------------------------

def test_local_send_rate_paces_permits_in_order():
    clock = task.Clock()
    rate = LocalSendRate(2, clock)  # 2/s, burst 2
    got = []
    for i in range(6):
        rate.acquire().addCallback(lambda _, i=i: got.append((i, clock.seconds())))
    assert [i for i, _ in got] == [0, 1]
    for _ in range(40):
        clock.advance(0.05)
    assert [i for i, _ in got] == [0, 1, 2, 3, 4, 5]
    assert [t for _, t in got][2:] == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=0.051)
    assert clock.getDelayedCalls() == []


def test_cancelled_permit_is_not_granted():
    clock = task.Clock()
    rate = LocalSendRate(1, clock)
    rate.acquire()
    d = rate.acquire()
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert rate.waiting == 0 and clock.getDelayedCalls() == []


def test_send_rate_zero_is_unlimited():
    assert isinstance(send_rate(0, task.Clock()), Unlimited)
    assert send_rate(0, task.Clock()).acquire().called
