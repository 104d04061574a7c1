"""Rate limits shared through a real redis-server: two stores or two whole gateways on one
Redis, windows on Redis's clock, and Redis killed, restarted and frozen mid-test."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from fakesmarthost import FakeSmarthost
from gateway.auth import AuthThrottle
from gateway.config import parse_config
from gateway.ratelimit import Bucket, Slot
from gateway.ratelimit_local import LocalStore
from gateway.ratelimit_redis import RedisStore
from gatewayrig import smarthost_entry, start_gateway

ALICE = ("alice-pw-1", ["alice@example.com"])


def section(url: str, **extra):
    data = {"listeners": [{"endpoint": "tcp:2525", "mode": "smtp"}],
            "smarthosts": [{"host": "smtp.example.test"}],
            "ratelimit": {"redis": url, "prefix": "test:", **extra}}
    return parse_config(data, base_dir=Path.cwd()).ratelimit


def rule(dimension, key, limit, window):
    return {"dimension": dimension, "key": key, "limit": limit, "window": window}


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await sleep(0.05)


@pytest_twisted.async_yield_fixture()
async def stores(redis_server):
    """Two stores on one Redis: two gateway nodes, as the limiter sees them."""
    made = [RedisStore(section(redis_server.url), reactor, LocalStore(reactor)) for _ in "ab"]
    yield made
    for store in made:
        await store.stop()


# --- the store ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_bucket_and_the_window_rolls_over_on_redis_time(
        stores, redis_server):
    a, b = stores
    bucket = Bucket("messages:user:alice:1", limit=2, window=1.0, cost=1)
    assert (await a.take([bucket])).refused is None
    assert (await b.take([bucket])).refused is None
    refused = await a.take([bucket])
    assert refused.refused == 0 and 0 < refused.retry_after <= 0.5
    assert (await b.take([bucket])).refused == 0
    assert b"test:messages:user:alice:1" in redis_server.command("KEYS", "test:*")
    ttl = int(redis_server.command("PTTL", "test:messages:user:alice:1")[1:].strip())
    assert 0 < ttl <= 1001                       # the key goes when the bucket is empty
    await sleep(refused.retry_after + 0.05)      # one unit back (Redis TIME, not ours)
    assert (await b.take([bucket])).refused is None
    assert (await a.take([bucket])).refused == 0
    await sleep(1.05)                            # a whole window: the whole burst again
    assert [(await a.take([bucket])).refused for _ in range(3)] == [None, None, 0]
    assert a.up and b.up and a.stats["fallback_calls"] == 0


@pytest_twisted.ensureDeferred
async def test_leases_and_auth_failures_are_shared(stores):
    a, b = stores
    slot = Slot("conn:ip:192.0.2.1", 1)
    assert (await a.acquire([slot], "node-a:1")).refused is None
    assert (await b.acquire([slot], "node-b:1")).refused == 0
    await a.refresh([([slot], "node-a:1")])
    assert (await b.acquire([slot], "node-b:1")).refused == 0
    await a.release([slot], "node-a:1")
    assert (await b.acquire([slot], "node-b:1")).refused is None

    ta, tb = AuthThrottle(3, 300, store=a), AuthThrottle(3, 300, store=b)
    assert await ta.record_failure("192.0.2.9") == 1
    assert await tb.record_failure("192.0.2.9") == 2
    assert not await ta.blocked("192.0.2.9")
    assert await ta.record_failure("192.0.2.9") == 3
    assert await tb.blocked("192.0.2.9")
    assert not await tb.blocked("192.0.2.10")
    for _ in range(5):
        assert await tb.record_failure("192.0.2.9") == 3   # saturates at max_failures


@pytest_twisted.ensureDeferred
async def test_frozen_redis_never_hangs_a_call_and_recovery_is_automatic(redis_server):
    for mode in ("fail_open", "fail_closed"):
        store = RedisStore(section(redis_server.url, fail_mode=mode, deadline=0.2), reactor,
                           LocalStore(reactor))
        bucket = Bucket(f"m:{mode}", limit=5, window=60, cost=1)
        assert (await store.take([bucket])).refused is None
        redis_server.freeze()
        try:
            started = time.monotonic()
            if mode == "fail_open":
                assert (await store.take([bucket])).refused is None   # the local store
            else:
                with pytest.raises(Exception, match="redis unavailable"):
                    await store.take([bucket])
            assert time.monotonic() - started < 2.0      # the deadline, not forever
            assert not store.up
            started = time.monotonic()
            for _ in range(3):                           # down: no call waits at all
                try:
                    await store.take([bucket])
                except Exception:
                    pass
            assert time.monotonic() - started < 0.1
        finally:
            redis_server.thaw()
        await until(lambda s=store: s.up)
        assert (await store.take([bucket])).refused is None
        await store.stop()


# --- two whole gateways ------------------------------------------------------------------

@pytest_twisted.async_yield_fixture()
async def smarthost():
    fs = FakeSmarthost(reactor, security="none", keep_messages=False)
    await fs.start()
    yield fs
    await fs.stop()


async def gateways(tmp_path, test_ca, server_cert, smarthost, redis_server, rules, **extra):
    out = []
    for name in ("node1", "node2"):
        (tmp_path / name).mkdir()
        out.append(await start_gateway(
            tmp_path / name, test_ca, server_cert,
            [smarthost_entry(smarthost.port, test_ca.ca_pem, security="none")],
            users={"alice": ALICE},
            ratelimit={"redis": redis_server.url, "rules": rules, "deadline": 0.3, **extra}))
    return out


def send(gw, sender, rcpts, login=False):
    """One transaction; (code, text) of the first refusal, or (250, b"") when queued."""
    with gw.smtp("submission" if login else "smtp") as c:
        c.ehlo("client.example")
        if login:
            c.starttls(context=gw.tls_context())
            c.ehlo("client.example")
            c.login("alice", ALICE[0])
        code, text = c.mail(sender)
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = c.rcpt(rcpt)
            if code != 250:
                return code, text
        code, text = c.data(b"Subject: t\r\n\r\nhello\r\n")
        return (250, b"") if code == 250 else (code, text)


async def run(*args, **kwargs):
    return await threads.deferToThread(send, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_two_gateways_enforce_one_combined_user_limit(tmp_path, test_ca, server_cert,
                                                             smarthost, redis_server):
    gw1, gw2 = await gateways(tmp_path, test_ca, server_cert, smarthost, redis_server,
                              [rule("messages", "user", 3, "1h")])
    try:
        results = [await run(gw, "alice@example.com", ["bob@example.net"], login=True)
                   for gw in (gw1, gw2, gw1, gw2)]
        assert [code for code, _ in results] == [250, 250, 250, 451]
        assert results[3][1].startswith(b"4.7.1 rate limit: user alice may send 3 messages"
                                        b" per hour; try again in ")
        # the trusted-network client is no user: not counted against alice
        assert (await run(gw2, "scanner@corp.example", ["bob@example.net"]))[0] == 250
    finally:
        await gw1.stop()
        await gw2.stop()


@pytest_twisted.ensureDeferred
async def test_two_gateways_share_ip_and_recipient_domain_limits(
        tmp_path, test_ca, server_cert, smarthost, redis_server):
    gw1, gw2 = await gateways(tmp_path, test_ca, server_cert, smarthost, redis_server,
                              [rule("recipients", "rcpt_domain", 3, "1h"),
                               rule("messages", "ip", 3, "1h")])
    try:
        assert await run(gw1, "a@corp.example", ["x@dom.test", "y@dom.test"]) == (250, b"")
        code, text = await run(gw2, "a@corp.example", ["z@dom.test", "w@dom.test"])
        assert code == 451 and b"recipient domain dom.test may send to 3 recipients" in text
        assert await run(gw2, "a@corp.example", ["q@other.test"]) == (250, b"")
        code, text = await run(gw1, "a@corp.example", ["q@other.test"])
        assert code == 451 and b"address 127.0.0.1 may send 3 messages per hour" in text
    finally:
        await gw1.stop()
        await gw2.stop()


@pytest_twisted.ensureDeferred
async def test_redis_killed_then_restarted_fail_open(tmp_path, test_ca, server_cert, smarthost,
                                                     redis_server):
    gw1, gw2 = await gateways(tmp_path, test_ca, server_cert, smarthost, redis_server,
                              [rule("messages", "ip", 2, "1h")])
    stores = [gw1.service.limiter.store, gw2.service.limiter.store]
    try:
        assert [(await run(gw, "a@corp.example", ["b@x.test"]))[0] for gw in (gw1, gw2, gw1)] \
            == [250, 250, 451]
        redis_server.kill()
        # fail_open: each node now limits alone, with the same rules, from empty buckets
        assert [(await run(gw1, "a@corp.example", ["b@x.test"]))[0] for _ in range(3)] \
            == [250, 250, 451]
        assert (await run(gw2, "a@corp.example", ["b@x.test"]))[0] == 250
        assert not any(s.up for s in stores) and stores[0].stats["fallback_calls"] >= 3
        redis_server.start()                 # same port, empty (no persistence)
        await until(lambda: all(s.up for s in stores))
        assert [(await run(gw, "a@corp.example", ["b@x.test"]))[0] for gw in (gw2, gw1, gw2)] \
            == [250, 250, 451]
    finally:
        await gw1.stop()
        await gw2.stop()


@pytest_twisted.ensureDeferred
async def test_redis_killed_then_restarted_fail_closed(tmp_path, test_ca, server_cert,
                                                       smarthost, redis_server):
    gw1, gw2 = await gateways(tmp_path, test_ca, server_cert, smarthost, redis_server,
                              [rule("messages", "ip", 5, "1h")], fail_mode="fail_closed")
    try:
        assert (await run(gw1, "a@corp.example", ["b@x.test"]))[0] == 250
        redis_server.kill()
        for gw in (gw1, gw2):
            code, text = await run(gw, "a@corp.example", ["b@x.test"])
            assert (code, text) == (451, b"4.7.1 rate limit service unavailable; try again later")
        redis_server.start()
        store = gw2.service.limiter.store
        await until(lambda: store.up)
        assert (await run(gw2, "a@corp.example", ["b@x.test"]))[0] == 250
    finally:
        await gw1.stop()
        await gw2.stop()


@pytest_twisted.ensureDeferred
async def test_frozen_redis_does_not_hang_a_session(tmp_path, test_ca, server_cert, smarthost,
                                                    redis_server):
    gw1, gw2 = await gateways(tmp_path, test_ca, server_cert, smarthost, redis_server,
                              [rule("messages", "ip", 50, "1h")])
    try:
        redis_server.freeze()
        try:
            started = time.monotonic()
            assert (await run(gw1, "a@corp.example", ["b@x.test"]))[0] == 250
            assert time.monotonic() - started < 10    # smtplib would wait 20 s per reply
        finally:
            redis_server.thaw()
        store = gw1.service.limiter.store
        await until(lambda: store.up)
        assert (await run(gw1, "a@corp.example", ["b@x.test"]))[0] == 250
    finally:
        await gw1.stop()
        await gw2.stop()
