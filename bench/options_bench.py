"""Cost of the X-Header policy per message (pure CPU, no sockets).

    PYTHONPATH=src python bench/options_bench.py [N]

Prints messages/s for a message without control headers (the fast path) and for one
with four control headers, defaults, forcing and a generated X-RefNumber.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gateway.config_values import Context
from gateway.optionpolicy import Submitter, XHeaderPolicy
from gateway.options_config import parse_options

OPTIONS = {"defaults": {"link_option": ["NotTrackOpen", "NotTrackAllLink"]},
           "force_on": {"link_option": 64}, "deny": {"list_option": [65536]},
           "ref_number_template": "{queue_id}"}
BODY = b"x" * 60 + b"\r\n"


def message(*headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("From: a@corp.example", "To: b@example.net",
                                         "Subject: bench", *headers))
    return head.encode() + b"\r\n" + BODY * 500  # ~31 KB


def run(policy: XHeaderPolicy, data: bytes, n: int) -> float:
    who = Submitter("alice", True)
    start = time.perf_counter()
    for i in range(n):
        policy.apply(who, data, time.time(), f"Q{i}")
    return n / (time.perf_counter() - start)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    policy = XHeaderPolicy(parse_options(OPTIONS, Context(Path("."), {})))
    plain = message()
    full = message("X-LinkOption: 2", "X-ListOption: 1", "X-SendOption: 4",
                   "X-NextLaunchTime: 2027-06-01T00:00:00+08:00")
    print(f"no control headers: {run(policy, plain, n):,.0f} messages/s")
    print(f"four headers + defaults: {run(policy, full, n):,.0f} messages/s")


if __name__ == "__main__":
    main()
