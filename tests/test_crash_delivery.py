"""SIGKILL a ``twistd`` gateway while it is delivering through the pool: nothing is lost.

A message in flight at the kill may reach the smarthost twice (its 250 came, but the
gateway died before recording it): the test counts and reports those duplicates.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import pytest_twisted
from twisted.internet import reactor, threads

from fakesmarthost import FakeSmarthost
from test_crash import send_until_killed, write_config
from twistdrig import TwistdProcess


@pytest_twisted.ensureDeferred
async def test_sigkill_during_delivery_loses_nothing(tmp_path, test_ca, record_property):
    fs = FakeSmarthost(reactor, security="smtps", cert=test_ca.issue("kill-sh", "localhost"))
    await fs.start()
    config = write_config(tmp_path, fs.port, test_ca.ca_pem)
    gw = TwistdProcess(config, tmp_path)
    second = None
    try:
        port = await threads.deferToThread(gw.wait_ready)
        accepted: list[str] = []
        stop = threading.Event()
        sender = threading.Thread(target=send_until_killed, args=(port, accepted, stop))
        sender.start()
        await fs.wait_for_messages(15, timeout=60)  # delivering through the pool now

        def kill() -> None:
            gw.kill()
            stop.set()
            sender.join(20)

        await threads.deferToThread(kill)
        before = fs.count
        second = TwistdProcess(config, tmp_path)
        await threads.deferToThread(second.wait_ready)

        def delivered() -> Counter[str]:
            return Counter(m.message_id for m in fs.messages if m.accepted)

        for _ in range(600):
            if set(accepted) <= set(delivered()):
                break
            await threads.deferToThread(time.sleep, 0.1)
        await threads.deferToThread(time.sleep, 1.0)  # anything extra would show up now
        counts = delivered()
        missing = set(accepted) - set(counts)
        duplicates = {mid: n for mid, n in counts.items() if n > 1}
        record_property("accepted", len(accepted))
        record_property("delivered_before_kill", before)
        record_property("duplicates", len(duplicates))
        print(f"accepted={len(accepted)} delivered before kill={before} "
              f"duplicates={len(duplicates)} {sorted(duplicates)}")
        assert not missing, f"lost: {sorted(missing)}"
        assert len(duplicates) <= 20  # at most the deliveries in flight (queue.concurrency)
        assert not os.listdir(tmp_path / "state" / "spool" / "corrupt")
    finally:
        if second is not None:
            second.stop()
        if gw.proc.poll() is None:
            gw.kill()
        await fs.stop()
