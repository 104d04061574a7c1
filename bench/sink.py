"""A minimal counting SMTP sink for the relay benchmark (asyncio, its own process).

It stands in for the smarthost: it accepts every message, answers pipelined commands in
order, ends DATA only on CRLF.CRLF and records, per benchmark Message-ID, when the
message arrived (time.monotonic(), which is CLOCK_MONOTONIC and so comparable across
processes on Linux).  It does not offer STARTTLS or AUTH.

Protocol on stdout, one line each:
    listening <port>
    progress <count>            (at most every 0.1 s, when the count changed)
    final <json>                (on SIGTERM/SIGINT, then it exits)

The final JSON: count (completed DATA transactions), unique (distinct benchmark
Message-IDs), duplicates, foreign (messages without a benchmark Message-ID, e.g. bounces),
connections, arrivals ({index: first arrival time}), cpu (seconds of this process).

    python bench/sink.py --port 0 --run-id RUN
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time

END = b"\r\n.\r\n"
MAX_LINE = 4096


class SinkState:
    def __init__(self, run_id: str) -> None:
        self.pattern = re.compile(rb"(?im)^Message-ID:[ \t]*<" + re.escape(run_id.encode())
                                  + rb"\.(\d+)@")
        self.count = 0
        self.duplicates = 0
        self.foreign = 0
        self.connections = 0
        self.arrivals: dict[int, float] = {}

    def record(self, message: bytes) -> None:
        now = time.monotonic()
        self.count += 1
        head_end = message.find(b"\r\n\r\n")
        match = self.pattern.search(message, 0, head_end if head_end >= 0 else len(message))
        if match is None:
            self.foreign += 1
            return
        index = int(match.group(1))
        if index in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[index] = now


class SinkProtocol(asyncio.Protocol):
    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.data: bytearray | None = None  # DATA in progress (starts with CRLF)
        self.scan = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.transport.write(b"220 sink.bench.test ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        while self.buffer:
            if self.data is not None:
                self.data += self.buffer
                self.buffer.clear()
                end = self.data.find(END, self.scan)
                if end < 0:
                    self.scan = max(0, len(self.data) - len(END))
                    break
                message = bytes(self.data[2:end + 2])
                self.buffer = self.data[end + len(END):]
                self.data = None
                self.state.record(message)
                out.append(b"250 2.0.0 Ok: queued as %d\r\n" % self.state.count)
                continue
            nl = self.buffer.find(b"\r\n")
            if nl < 0:
                if len(self.buffer) > MAX_LINE:
                    out.append(b"500 5.5.6 Line too long\r\n")
                    self.buffer.clear()
                break
            line = bytes(self.buffer[:nl])
            del self.buffer[:nl + 2]
            reply = self.command(line)
            if reply is None:  # QUIT
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            out.append(reply)
        if out:
            self.transport.write(b"".join(out))

    def command(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return (b"250-sink.bench.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                    b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
        if verb == b"HELO":
            return b"250 sink.bench.test\r\n"
        if verb == b"MAIL":
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            self.data, self.scan = bytearray(b"\r\n"), 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb in (b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            return None
        return b"502 5.5.2 Command not implemented\r\n"


async def serve(port: int, interface: str, run_id: str) -> None:
    state = SinkState(run_id)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(state), interface, port,
                                      backlog=512, reuse_address=True)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reported = -1
    while not stop.is_set():
        if state.count != reported:
            reported = state.count
            print(f"progress {reported}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass
    server.close()
    final = {"count": state.count, "unique": len(state.arrivals),
             "duplicates": state.duplicates, "foreign": state.foreign,
             "connections": state.connections, "cpu": time.process_time(),
             "arrivals": state.arrivals}
    print("final " + json.dumps(final, separators=(",", ":")), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--run-id", default="bench")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.interface, args.run_id))
    sys.exit(0)


if __name__ == "__main__":
    main()
