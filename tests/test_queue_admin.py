"""``itpison-gateway queue ...`` (a real subprocess) against a live gateway's control socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from gatewayrig import smarthost_entry, start_gateway

SRC = str(Path(__file__).resolve().parent.parent / "src")


def cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "gateway.cli", "queue", "--state-dir",
                           str(state), *args], capture_output=True, text=True, env=env,
                          timeout=60)


async def run(state: Path, *args: str) -> subprocess.CompletedProcess:
    return await threads.deferToThread(cli, state, *args)


async def listing(state: Path, *args: str) -> list[dict]:
    r = await run(state, "list", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def send(gw, sender: str, rcpts: list[str], n: int) -> None:
    with gw.smtp() as c:
        c.sendmail(sender, rcpts, f"Subject: admin {n}\r\n\r\nbody {n}\r\n")


async def wait_until(check, what: str, tries: int = 100) -> None:
    from test_failover import sleep
    for _ in range(tries):
        if await check():
            return
        await sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_every_queue_subcommand_against_a_live_gateway(tmp_path, test_ca, server_cert):
    fs = FakeSmarthost(reactor, security="smtps", cert=server_cert,
                       responses={"greeting": "421 4.3.2 maintenance"})
    await fs.start()
    gw = await start_gateway(tmp_path, test_ca, server_cert,
                             [smarthost_entry(fs.port, test_ca.ca_pem)],
                             queue={"retry_min": 300, "retry_max": 600})
    state = tmp_path / "state"
    try:
        sock = state / "control.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        await threads.deferToThread(send, gw, "app@corp.example", ["a@example.net"], 1)
        await threads.deferToThread(send, gw, "app@corp.example", ["b@example.org"], 2)
        await threads.deferToThread(send, gw, "other@corp.example",
                                    ["c@example.net", "d@example.net"], 3)

        async def all_deferred() -> bool:
            items = await listing(state)
            return len(items) == 3 and all(e["state"] == "deferred" for e in items)
        await wait_until(all_deferred, "three deferred messages")
        items = await listing(state)
        ids = [e["id"] for e in items]

        r = await run(state, "summary")
        assert r.returncode == 0 and "deferred" in r.stdout
        summary = json.loads((await run(state, "summary", "--json")).stdout)
        assert summary["total"] == 3 and summary["states"]["deferred"]["T"] == 3
        assert summary["pending_by_domain"] == {"example.net": 3, "example.org": 1}

        assert [e["id"] for e in await listing(state, "--recipient", "@example.net")] == \
            [ids[0], ids[2]]
        assert [e["id"] for e in await listing(state, "--sender", "other@corp.example")] == \
            [ids[2]]
        assert await listing(state, "--user", "nobody") == []
        assert len(await listing(state, "--state", "deferred")) == 3
        text = await run(state, "list")
        assert text.returncode == 0 and "3 messages" in text.stdout

        shown = json.loads((await run(state, "show", ids[2], "--json")).stdout)
        assert shown["envelope"]["sender"] == "other@corp.example"
        assert [r["status"] for r in shown["recipient_status"]] == ["pending", "pending"]
        assert shown["history"] and all("421" in h["reply"] and h["host"] == f"127.0.0.1:{fs.port}"
                                        for h in shown["history"])
        human = await run(state, "show", ids[2])
        assert "attempts:" in human.stdout and "421" in human.stdout

        r = await run(state, "hold", ids[0])
        assert (r.returncode, r.stdout.strip()) == (0, f"{ids[0]}: held")
        assert [e["id"] for e in await listing(state, "--state", "hold")] == [ids[0]]
        r = await run(state, "hold", ids[0])
        assert r.returncode == 1 and "no such message" in r.stdout
        r = await run(state, "flush", ids[0])
        assert "held: release it first" in r.stdout

        r = await run(state, "delete", ids[1])
        assert (r.returncode, r.stdout.strip()) == (0, f"{ids[1]}: deleted")
        assert (await run(state, "show", ids[1])).returncode == 1

        r = await run(state, "bounce", ids[2])
        assert (r.returncode, r.stdout.strip()) == (0, f"{ids[2]}: bounced")
        after = await listing(state)
        dsn = [e for e in after if e["sender"] == ""]
        assert [e["recipients"] for e in dsn] == [["other@corp.example"]]

        r = await run(state, "release", ids[0])
        assert (r.returncode, r.stdout.strip()) == (0, f"{ids[0]}: released")
        fs.responses.pop("greeting")  # the smarthost is back; retries are 5 minutes away
        r = await run(state, "flush")
        assert r.returncode == 0
        got = await fs.wait_for_messages(2, timeout=20)  # the released message and the DSN
        assert sorted(m.mail_from for m in got) == ["", "app@corp.example"]

        async def empty() -> bool:
            return await listing(state) == []
        await wait_until(empty, "an empty queue")
        r = await run(state, "hold", "not/an-id")
        assert r.returncode == 1 and "bad queue id" in r.stderr
    finally:
        await gw.stop()
        await fs.stop()
    assert not (state / "control.sock").exists()
    # With the gateway stopped: read-only commands read the spool, the others refuse.
    assert (await run(state, "summary")).returncode == 0
    r = await run(state, "flush")
    assert r.returncode == 1 and "not running" in r.stderr
