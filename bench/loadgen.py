"""The benchmark's load generator: C SMTP sessions sending N messages back to back.

Runs in its own process (asyncio), so it does not compete with the server under test for
a GIL.  Each session keeps one connection open, sends EHLO once, then per message
MAIL FROM / RCPT TO / DATA (pipelined when the server offers PIPELINING), the message,
and ".".  The latency of a message is from writing the final ".\\r\\n" to reading the
whole reply to it.  A session whose connection breaks counts an error and reconnects
(at most ``MAX_RECONNECTS`` times).

Prints one JSON object on stdout when done (see ``main``); progress goes to stderr.

    python bench/loadgen.py --port 2525 -n 10000 -c 20 --size 5120 --run-id RUN
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

SENDER = "app@corp.example"
RECIPIENT = "someone@example.net"
MAX_RECONNECTS = 5
WORDS = (
    "the quarterly report shows that revenue in the northern region grew again while "
    "costs stayed flat please review the attached figures before thursday meeting and "
    "send any questions to finance team we expect shipment of new printers next week "
    "so the scanning service may be interrupted for about an hour on monday morning "
    "invoice number order customer account balance payment reminder schedule project "
    "update status release deployment server maintenance window ticket support request "
    "approved pending delivered warehouse inventory contract renewal budget forecast"
).split()


def make_body(size: int, seed: int) -> list[bytes]:
    """Plain-text lines (<= 78 characters) of sentences, about ``size`` bytes with CRLF."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    total = 0
    while total < size:
        words: list[str] = []
        line = ""
        while True:
            n = rng.randint(6, 14)
            sentence = " ".join(rng.choice(WORDS) for _ in range(n))
            sentence = sentence[0].upper() + sentence[1:] + rng.choice(".,.;.?")
            for word in sentence.split():
                candidate = f"{line} {word}" if line else word
                if len(candidate) > 72:
                    words.append(line)
                    line = word
                else:
                    line = candidate
            if len(words) >= 6 or rng.random() < 0.15:
                words.append(line)
                break
        for text in words + [""]:
            lines.append(text.encode() + b"\r\n")
            total += len(text) + 2
    return lines


class Messages:
    """Message bytes (dot-stuffed, CRLF, without the final ".") of about ``size`` bytes."""

    def __init__(self, size: int, run_id: str, variants: int = 16) -> None:
        self.run_id = run_id
        self.size = size
        self.bodies: list[bytes] = []
        for seed in range(variants):  # generated long enough, then trimmed per message
            self.bodies.append(b"".join(make_body(size, seed)))

    def message(self, index: int) -> bytes:
        headers = (
            f"From: Application Server <{SENDER}>\r\n"
            f"To: Someone <{RECIPIENT}>\r\n"
            f"Subject: Benchmark message {index}: quarterly report and invoice status\r\n"
            f"Date: {email.utils.formatdate(localtime=False)}\r\n"
            f"Message-ID: <{self.run_id}.{index}@bench.corp.example>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            "\r\n"
        ).encode()
        body = self.bodies[index % len(self.bodies)]
        room = self.size - len(headers)
        if room < len(body):  # trim to the size at a line boundary
            cut = body.rfind(b"\r\n", 0, max(room, 2))
            body = body[:cut + 2] if cut >= 0 else b""
        data = headers + body
        if data.startswith(b"."):
            data = b"." + data
        return data.replace(b"\r\n.", b"\r\n..")


@dataclass
class Results:
    accepted: list[int] = field(default_factory=list)  # indexes answered 250 after DATA
    latency: list[float] = field(default_factory=list)  # end of DATA -> reply, seconds
    accepted_at: dict[int, float] = field(default_factory=dict)  # index -> 250 time
    errors: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    first_connect: float = 0.0
    last_reply: float = 0.0


class Reader:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def reply(self) -> tuple[int, str]:
        """One whole reply: (code, last line)."""
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line[3:4] != b"-":
                code = int(line[:3]) if line[:3].isdigit() else 0
                return code, line.decode("ascii", "replace").rstrip()


class Load:
    def __init__(self, host: str, port: int, total: int, concurrency: int, size: int,
                 run_id: str, timeout: float, pipelining: bool) -> None:
        self.host, self.port = host, port
        self.total = total
        self.concurrency = concurrency
        self.messages = Messages(size, run_id)
        self.timeout = timeout
        self.pipelining = pipelining
        self.next_index = 0
        self.results = Results()
        self.done = 0

    def take(self) -> int | None:
        if self.next_index >= self.total:
            return None
        self.next_index += 1
        return self.next_index - 1

    async def run(self) -> Results:
        self.results.first_connect = time.monotonic()
        progress = asyncio.create_task(self.progress())
        await asyncio.gather(*(self.session(i) for i in range(self.concurrency)))
        progress.cancel()
        return self.results

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(5)
            rate = self.done / max(time.monotonic() - self.results.first_connect, 1e-9)
            print(f"loadgen: {self.done}/{self.total} answered ({rate:.0f}/s)",
                  file=sys.stderr, flush=True)

    async def session(self, number: int) -> None:
        failures = 0
        while self.next_index < self.total and failures <= MAX_RECONNECTS:
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError) as e:
                self.results.errors[f"connect: {type(e).__name__}"] += 1
                failures += 1
                await asyncio.sleep(0.5)
                continue
            self.results.connects += 1
            try:
                if not await self.converse(Reader(reader), writer):
                    failures += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError) as e:
                self.results.errors[f"connection: {type(e).__name__}"] += 1
                failures += 1
            finally:
                writer.close()

    async def converse(self, reader: Reader, writer: asyncio.StreamWriter) -> bool:
        """One connection: True if it ended because there was nothing left to send."""
        async with asyncio.timeout(self.timeout):
            code, line = await reader.reply()
            if code != 220:
                self.results.errors[f"greeting: {line}"] += 1
                return False
            writer.write(b"EHLO loadgen.bench.test\r\n")
            extensions = []
            while True:
                raw = await reader.reader.readuntil(b"\r\n")
                extensions.append(raw[4:].strip().upper())
                if raw[3:4] != b"-":
                    break
            if raw[:3] != b"250":
                self.results.errors[f"ehlo: {raw!r}"] += 1
                return False
        pipelining = self.pipelining and b"PIPELINING" in extensions
        while (index := self.take()) is not None:
            async with asyncio.timeout(self.timeout):
                ok = await self.transaction(reader, writer, index, pipelining)
            self.done += 1
            if not ok:
                writer.write(b"RSET\r\n")
                code, line = await reader.reply()
                if code != 250:
                    return False
        writer.write(b"QUIT\r\n")
        try:
            async with asyncio.timeout(5):
                await reader.reply()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        return True

    async def transaction(self, reader: Reader, writer: asyncio.StreamWriter, index: int,
                          pipelining: bool) -> bool:
        data = self.messages.message(index)
        commands = (f"MAIL FROM:<{SENDER}> SIZE={len(data)}\r\n".encode(),
                    f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"DATA\r\n")
        expected = (250, 250, 354)
        replies = []
        if pipelining:
            writer.write(b"".join(commands))
            for _ in commands:
                replies.append(await reader.reply())
        else:
            for command, want in zip(commands, expected, strict=True):
                writer.write(command)
                replies.append(await reader.reply())
                if replies[-1][0] != want:
                    break
        for stage, (code, line), want in zip(("mail", "rcpt", "data"), replies, expected,
                                             strict=False):
            if code != want:
                self.results.errors[f"{stage}: {line[:60]}"] += 1
                if replies[-1][0] == 354:  # DATA was accepted all the same: end it empty
                    writer.write(b".\r\n")
                    await reader.reply()
                return False
        writer.write(data + b".\r\n")
        sent = time.monotonic()
        code, line = await reader.reply()
        now = time.monotonic()
        self.results.latency.append(now - sent)
        self.results.last_reply = now
        if code == 250:
            self.results.accepted.append(index)
            self.results.accepted_at[index] = now
            return True
        self.results.errors[f"data_end: {line[:60]}"] += 1
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", type=int, default=10000, help="messages in total")
    parser.add_argument("-c", type=int, default=20, help="concurrent sessions")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes")
    parser.add_argument("--run-id", default="bench")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="per-reply deadline in seconds")
    parser.add_argument("--no-pipelining", action="store_true")
    args = parser.parse_args(argv)
    load = Load(args.host, args.port, args.n, args.c, args.size, args.run_id, args.timeout,
                not args.no_pipelining)
    results = asyncio.run(load.run())
    sizes = [len(load.messages.message(i)) for i in range(min(args.n, 16))]
    json.dump({"first_connect": results.first_connect, "last_reply": results.last_reply,
               "accepted": len(results.accepted), "answered": len(results.latency),
               "latency": results.latency, "accepted_at": results.accepted_at,
               "errors": dict(results.errors), "connects": results.connects,
               "message_bytes": sum(sizes) / len(sizes) if sizes else 0,
               "cpu": time.process_time()}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
