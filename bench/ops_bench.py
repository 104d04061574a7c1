"""Operations benchmark: what metrics cost on the relay path, and what a scrape costs.

    PYTHONPATH=src python bench/ops_bench.py [--messages 400] [--concurrency 8]

A real ``twistd itpison-gateway`` process relays to a tests/fakesmarthost.py sink (both
plain SMTP on 127.0.0.1, so the figures are the gateway's own work: parse, policy, spool
fsync, relay).  Clients are smtplib threads, one message per transaction on kept-open
sessions.  Run 1: ``[metrics]`` off; run 2: on.  Figures: messages accepted per second,
seconds until the queue is empty (all delivered), and the median time of a /metrics
scrape afterwards.
"""

from __future__ import annotations

import argparse
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
MESSAGE = (b"From: bench@corp.example\r\nTo: x@example.net\r\nSubject: bench\r\n\r\n"
           + b"x" * 76 + b"\r\n") * 40  # ~3 KB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def gateway(tmp: Path, smtp: int, sink: int, metrics: int | None) -> subprocess.Popen:
    conf = tmp / "gw.toml"
    conf.write_text(f"""
[gateway]
hostname = "gw.example.test"
state_dir = "{tmp / 'state'}"
[[listeners]]
endpoint = "tcp:{smtp}:interface=127.0.0.1"
mode = "smtp"
[[smarthosts]]
host = "127.0.0.1"
port = {sink}
security = "none"
[limits]
max_connections_per_ip = 1000
""" + (f'[metrics]\nendpoint = "tcp:{metrics}:interface=127.0.0.1"\n' if metrics else ""))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp)}
    return subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "itpison-gateway",
                             "--config", str(conf)], cwd=tmp, env=env)


def send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        for _ in range(n):
            c.sendmail("bench@corp.example", ["x@example.net"], MESSAGE)


def scrape(port: int) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        r.read()
    return time.perf_counter() - start


def run(n: int, concurrency: int, with_metrics: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sink_port, smtp, metrics = free_port(), free_port(), free_port()
        sink = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakesmarthost.py"),
                                 "--port", str(sink_port)], stdout=subprocess.PIPE, text=True)
        assert "listening" in sink.stdout.readline()
        gw = gateway(tmp, smtp, sink_port, metrics if with_metrics else None)
        try:
            wait_port(smtp)
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda _: send(smtp, n // concurrency), range(concurrency)))
            accepted = time.perf_counter() - start
            queue = tmp / "state" / "spool" / "queue"
            while any(queue.iterdir()):
                time.sleep(0.05)
            drained = time.perf_counter() - start
            total = (n // concurrency) * concurrency
            line = (f"metrics {'on ' if with_metrics else 'off'}: {total} messages,"
                    f" {total / accepted:7.1f} accepted/s, all delivered after {drained:5.2f}s")
            if with_metrics:
                times = [scrape(metrics) for _ in range(20)]
                line += f", /metrics scrape median {statistics.median(times) * 1000:.1f} ms"
            print(line, flush=True)
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(60)
            sink.send_signal(signal.SIGTERM)
            sink.communicate(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    run(args.messages, args.concurrency, with_metrics=False)
    run(args.messages, args.concurrency, with_metrics=True)
