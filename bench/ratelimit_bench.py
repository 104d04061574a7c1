"""Rate limiter benchmark: checks per second against Redis, and the cost per relayed message.

    python bench/ratelimit_bench.py                     # defaults: 20000 checks, 2000 messages
    python bench/ratelimit_bench.py --checks 50000 --inflight 64 --messages 3000 --json

Part 1, checks per second: one process (this one) runs ``RedisStore.take`` (one GCRA
script call, three buckets: user per minute/hour/day) against a redis-server it starts on
loopback, with ``--inflight`` calls outstanding; then the same against the in-process
``LocalStore``.

Part 2, end to end: an in-process gateway (GatewayService: smtp listener, spool, relay)
relays ``--messages`` messages from a separate client process (smtplib, ``--sessions``
threads, 1 recipient, 2 KB) to a counting sink, three times: without rules, with six
rules (messages/recipients/bytes per ip and per sender domain) in the in-process store,
and with the same rules in Redis.  Reported per run: messages/s accepted, and the
gateway process's CPU seconds per message; the difference to the first run is the
limiter's cost per message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from twisted.internet import defer, reactor, task, threads  # noqa: E402

from fakesmarthost import FakeSmarthost  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.ratelimit import Bucket  # noqa: E402
from gateway.ratelimit_local import LocalStore  # noqa: E402
from gateway.ratelimit_redis import RedisStore  # noqa: E402
from gateway.service import GatewayService  # noqa: E402
from redisrig import RedisServer  # noqa: E402

CLIENT = r"""
import smtplib, sys, threading, time
port, n, sessions = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25
left = list(range(n)); lock = threading.Lock(); errors = [0]
def worker():
    c = smtplib.SMTP("127.0.0.1", port, timeout=60); c.ehlo("bench")
    while True:
        with lock:
            if not left: break
            left.pop()
        try:
            c.sendmail("bench@corp.example", ["to@example.net"], body)
        except smtplib.SMTPException:
            errors[0] += 1
    c.quit()
start = time.monotonic()
ts = [threading.Thread(target=worker) for _ in range(sessions)]
[t.start() for t in ts]; [t.join() for t in ts]
print(time.monotonic() - start, errors[0])
"""

RULES = [{"dimension": d, "key": k, "limit": 10**9 if d == "bytes" else 10**7, "window": "1h"}
         for d in ("messages", "recipients", "bytes") for k in ("ip", "sender_domain")]


def section(url: str | None):
    rl = {"rules": RULES}
    if url:
        rl["redis"] = url
    return rl


async def checks_per_second(store, total: int, inflight: int) -> float:
    buckets = [Bucket(f"bench:{w}", 10**12, w, 1) for w in (60.0, 3600.0, 86400.0)]
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < total:
            done += 1
            answer = await store.take(buckets)
            assert answer.refused is None

    start = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(inflight)])
    return total / (time.perf_counter() - start)


async def relay_run(tmp: Path, sink_port: int, rl: dict, messages: int, sessions: int) -> dict:
    data = {"gateway": {"hostname": "bench.example.test", "state_dir": str(tmp / "state")},
            "listeners": [{"endpoint": "tcp:0:interface=127.0.0.1", "mode": "smtp"}],
            "smarthosts": [{"host": "127.0.0.1", "port": sink_port, "security": "none"}],
            "ratelimit": rl}
    service = GatewayService(parse_config(data, base_dir=tmp), reactor)
    service.startService()
    port = service.ports[0].getHost().port
    cpu0 = time.process_time()
    proc = await threads.deferToThread(
        subprocess.run, [sys.executable, "-c", CLIENT, str(port), str(messages), str(sessions)],
        capture_output=True, text=True, check=True)
    cpu = time.process_time() - cpu0
    elapsed, errors = proc.stdout.split()
    await service.scheduler.settle()
    stats = dict(getattr(service.limiter.store, "stats", {}))
    await service.stopService()
    return {"messages_per_s": round(messages / float(elapsed), 1), "errors": int(errors),
            "cpu_ms_per_message": round(cpu * 1000 / messages, 3), "store": stats}


async def main(args: argparse.Namespace) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        redis = RedisServer(tmp)
        redis.start()
        try:
            rl = parse_config({"listeners": [{"endpoint": "tcp:1", "mode": "smtp"}],
                               "smarthosts": [{"host": "x.test"}],
                               "ratelimit": {"redis": redis.url}},
                              base_dir=tmp).ratelimit
            store = RedisStore(rl, reactor, LocalStore(reactor))
            await checks_per_second(store, 500, 8)  # warm up: connect, load the script
            out["redis_checks_per_s"] = round(
                await checks_per_second(store, args.checks, args.inflight))
            out["redis_checks_per_s_1_inflight"] = round(
                await checks_per_second(store, args.checks // 4, 1))
            await store.stop()
            out["local_checks_per_s"] = round(
                await checks_per_second(LocalStore(reactor), args.checks, args.inflight))
            sink = FakeSmarthost(reactor, security="none", keep_messages=False)
            sink_port = await sink.start()
            for name, rl in (("no_rules", {}), ("in_process_6_rules", section(None)),
                             ("redis_6_rules", section(redis.url))):
                run_dir = tmp / name
                run_dir.mkdir()
                out[name] = await relay_run(run_dir, sink_port, rl, args.messages, args.sessions)
            await sink.stop()
        finally:
            redis.kill()
    base = out["no_rules"]["cpu_ms_per_message"]
    for name in ("in_process_6_rules", "redis_6_rules"):
        out[name]["extra_cpu_ms_per_message"] = round(out[name]["cpu_ms_per_message"] - base, 3)
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    async def run() -> None:
        result = await main(args)
        if args.json:
            print(json.dumps(result, indent=2))
            return
        for key, value in result.items():
            print(f"{key}: {value}")

    task.react(lambda _reactor: defer.ensureDeferred(run()))


if __name__ == "__main__":
    cli()
