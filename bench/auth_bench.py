"""LDAP authentication benchmark: logins per second and latency against a real slapd.

    python bench/auth_bench.py                          # defaults: 2000 logins, 16 in flight
    python bench/auth_bench.py --logins 5000 --inflight 32 --json

Starts its own slapd (tests/slapdrig.py: people, groups, a service account, a test CA) and
runs ``LdapChecker.requestAvatarId`` (search with the pooled service connection, then a
bind as the user on a new StartTLS connection, group gate by memberOf, attribute mapping)
from this process, with ``--inflight`` logins outstanding, in four runs:

1. StartTLS, search then bind, cache off (every login goes to the directory);
2. the same over LDAPS;
3. StartTLS with the positive cache on and the same few users logging in again and again
   (after the first login of each, every login is a cache hit);
4. wrong passwords through the whole ``CheckerChain`` with the default 0.3 s failure floor
   (the floor, not the directory, sets their latency).

Per run: logins/s, p50, p99 and max latency (ms), and the cache hits.  The thread pool
and the number of checks in flight are bounded by ``pool_size`` (4 by default): the
numbers say what one gateway process gets from one directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from twisted.cred.credentials import UsernamePassword  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from gateway.auth import CheckerChain  # noqa: E402
from gateway.auth_ldap import LdapChecker  # noqa: E402
from gateway.config_auth import LdapSection  # noqa: E402
from pki import TestCA  # noqa: E402
from slapdrig import PASSWORDS, SERVICE_DN, SERVICE_PASSWORD, SUFFIX, Slapd  # noqa: E402

USERS = ["alice", "dave", "twin1", "star"]  # members of the "relay" group


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def run(name: str, checker, logins: int, inflight: int, wrong: bool = False) -> dict:
    latencies: list[float] = []
    failures = 0
    semaphore = defer.DeferredSemaphore(inflight)

    async def one(i: int) -> None:
        nonlocal failures
        user = USERS[i % len(USERS)]
        password = "wrong" if wrong else PASSWORDS[user]
        start = time.perf_counter()
        try:
            await checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))
        except Exception:  # noqa: BLE001 - counted; wrong passwords fail by design
            failures += 1
        latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await defer.gatherResults([semaphore.run(lambda i=i: defer.ensureDeferred(one(i)))
                               for i in range(logins)])
    elapsed = time.perf_counter() - began
    cache = getattr(checker, "cache", None)
    return {"run": name, "logins": logins, "per_second": round(logins / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2), "failures": failures,
            "cache_hits": cache.hits if cache is not None else 0}


async def main(reactor_, args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    ca = TestCA(tmp / "pki")
    (tmp / "slapd").mkdir()
    slapd = Slapd(tmp / "slapd", ca)
    slapd.start()
    base = LdapSection(urls=(slapd.url,), starttls=True, ca_file=slapd.ca_pem,
                       bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD, base_dn=SUFFIX,
                       required_groups=("relay",), class_attribute="mailRateClass",
                       cache_ttl=0, pool_size=args.pool_size)
    runs = [("starttls, no cache", base, False),
            ("ldaps, no cache", dataclasses.replace(base, urls=(slapd.ldaps_url,),
                                                    starttls=False), False),
            ("starttls, cache 60s", dataclasses.replace(base, cache_ttl=60), False),
            ("wrong password, chain floor 0.3s", base, True)]
    results = []
    try:
        for name, section, wrong in runs:
            checker = LdapChecker(section, reactor_)
            checker.startService()
            try:
                target = CheckerChain([checker], reactor_, 0.3) if wrong else checker
                n = args.logins if not wrong else min(args.logins, 400)
                await run(name + " (warm-up)", target, min(50, n), args.inflight, wrong)
                if hasattr(target, "cache"):
                    target.cache.hits = 0
                results.append(await run(name, target, n, args.inflight, wrong))
                if not args.json:
                    print(json.dumps(results[-1]))
            finally:
                await checker.stopService()
    finally:
        slapd.stop()
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(main(r, options)))
