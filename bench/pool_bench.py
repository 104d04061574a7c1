"""Relay pool benchmark: connection reuse vs one connection per message, and failover time.

    PYTHONPATH=src python bench/pool_bench.py [--messages 1000] [--concurrency 10]

The smarthosts are tests/fakesmarthost.py sink processes with implicit TLS (certificates
from a throwaway test CA), so TLS handshakes cost what they cost.  The relay runs here,
in this process (gateway.relay.SmarthostRelay, the code the scheduler calls).

1. throughput: N messages, C at a time, with max_messages_per_connection = 1 (a new TCP
   + TLS + EHLO per message) and = 100 (the default, RSET between messages);
2. failover: N messages to [primary, backup]; the primary is SIGKILLed after N/5 have been
   delivered.  A message that comes back TEMPFAIL is retried at once (as a flush would):
   the figures are how long deliveries stalled, how many messages were delayed, and that
   none was lost (the sinks' counts add up to N).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from twisted.internet import defer, task  # noqa: E402

from gateway.config import RelaySection, SmarthostSection  # noqa: E402
from gateway.delivery import Outcome  # noqa: E402
from gateway.envelope import Envelope, new_queue_id  # noqa: E402
from gateway.relay import SmarthostRelay  # noqa: E402
from pki import TestCA  # noqa: E402

MESSAGE = (b"From: bench@corp.example\r\nTo: x@example.net\r\nSubject: bench\r\n\r\n"
           + b"x" * 76 + b"\r\n") * 40  # ~3 KB
CFG = RelaySection(connect_timeout=5, greeting_timeout=5, command_timeout=5, data_timeout=10,
                   breaker_failures=3, breaker_cooldown=5)


class Sink:
    def __init__(self, port: int, cert: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fakesmarthost.py"), "--port", str(port),
             "--security", "smtps", "--cert", str(cert.cert), "--key", str(cert.key)],
            stdout=subprocess.PIPE, text=True)
        assert "listening" in self.proc.stdout.readline()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            out = self.proc.communicate(timeout=10)[0]
            return int(out.split("messages: ")[1].split()[0])
        return -1

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host(port: int, ca: TestCA) -> SmarthostSection:
    return SmarthostSection("127.0.0.1", port, "smtps", ca_file=ca.ca_pem, tls_name="localhost")


async def run(relay: SmarthostRelay, n: int, concurrency: int, reactor: object,
              on_delivered: object = None) -> dict:
    sem = defer.DeferredSemaphore(concurrency)
    delayed, retries, gap = set(), 0, [0.0, time.monotonic()]

    async def one(i: int) -> None:
        nonlocal retries
        env = Envelope(new_queue_id(), "bench@corp.example", ("x@example.net",), time.time())
        while True:
            result = await relay.deliver(env, MESSAGE)
            if result.results[0].outcome is Outcome.DELIVERED:
                now = time.monotonic()
                gap[0], gap[1] = max(gap[0], now - gap[1]), now
                if on_delivered:
                    on_delivered()
                return
            delayed.add(i)
            retries += 1
            await task.deferLater(reactor, 0.05, lambda: None)

    start = time.monotonic()
    await defer.gatherResults([sem.run(lambda i=i: defer.ensureDeferred(one(i)))
                               for i in range(n)])
    elapsed = time.monotonic() - start
    await relay.close()
    return {"elapsed": elapsed, "rate": n / elapsed, "delayed": len(delayed),
            "retries": retries, "longest_gap": gap[0]}


async def main(reactor: object, args: argparse.Namespace) -> None:
    ca = TestCA(Path(tempfile.mkdtemp(prefix="pool-bench-")))
    cert = ca.issue("sink", "localhost")
    print(f"{args.messages} messages of {len(MESSAGE)} bytes, {args.concurrency} at a time, "
          "smtps to a sink process")
    for label, per_conn in (("one connection per message", 1), ("pooled (RSET reuse)", 100)):
        port = free_port()
        sink = Sink(port, cert)
        relay = SmarthostRelay([host(port, ca)], replace(CFG, max_messages_per_connection=per_conn),
                               "bench.example", reactor)
        r = await run(relay, args.messages, args.concurrency, reactor)
        print(f"  {label:28} {r['rate']:8.0f} msg/s  ({r['elapsed']:.2f}s, "
              f"{relay.pool.created} connections, sink counted {sink.stop()})")

    pport, bport = free_port(), free_port()
    primary, backup = Sink(pport, cert), Sink(bport, cert)
    relay = SmarthostRelay([host(pport, ca), host(bport, ca)], CFG, "bench.example", reactor)
    done = [0]
    killed = [0.0]

    def delivered() -> None:
        done[0] += 1
        if done[0] == args.messages // 5 and not killed[0]:
            primary.kill()
            killed[0] = time.monotonic()

    r = await run(relay, args.messages, args.concurrency, reactor, delivered)
    got_b = backup.stop()
    print(f"failover: primary SIGKILLed after {args.messages // 5} deliveries")
    print(f"  longest stall between two deliveries: {r['longest_gap'] * 1000:.1f} ms; "
          f"messages delayed: {r['delayed']} (retries {r['retries']}); "
          f"backup delivered {got_b}, primary {args.messages - got_b}; total {r['rate']:.0f} msg/s; none lost: "
          f"{done[0] == args.messages}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
