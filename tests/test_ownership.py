"""Queue slots (gateway.ownership), the spool seen through them, the workers setting and
its per-worker share, and the supervisor's merge of the workers' metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from gateway import config_ops
from gateway.config import ConfigError, default_config, parse_config, worker_share
from gateway.envelope import Envelope, new_queue_id
from gateway.metrics import GatewayCollector
from gateway.ownership import SLOTS, QueueOwnership, SlotsBusy, owner_of, slot_of, slots_for
from gateway.spool import Spool
from gateway.supervisor_web import merge

SRC = str(Path(__file__).parent.parent / "src")


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 64])
def test_the_workers_slots_partition_every_slot(count: int) -> None:
    owned = [slots_for(i, count) for i in range(count)]
    assert set().union(*owned) == set(range(SLOTS))
    assert sum(len(s) for s in owned) == SLOTS  # disjoint
    for _ in range(200):
        qid = new_queue_id()
        assert sum(slot_of(qid) in s for s in owned) == 1
        assert slot_of(qid) in owned[owner_of(qid, count)]


@pytest.mark.parametrize("index,count", [(0, 0), (2, 2), (-1, 2), (0, 65)])
def test_impossible_worker_numbers_are_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        slots_for(index, count)


def test_new_ids_fall_in_the_slots_held(tmp_path: Path) -> None:
    own = QueueOwnership(tmp_path, 1, 3)
    ids = {own.new_id() for _ in range(300)}
    assert len(ids) == 300
    assert all(own.owns(q) and owner_of(q, 3) == 1 for q in ids)


def test_a_slot_is_held_by_one_owner_whatever_the_worker_counts(tmp_path: Path) -> None:
    single = QueueOwnership(tmp_path)
    single.acquire()
    assert single.held
    for index, count in ((0, 2), (1, 2), (5, 7)):
        other = QueueOwnership(tmp_path, index, count)
        with pytest.raises(SlotsBusy, match=f"pid {os.getpid()}"):
            other.acquire(timeout=0)
        assert not other.held  # nothing half-held after a refusal
    single.release()
    halves = [QueueOwnership(tmp_path, i, 2) for i in (0, 1)]
    for half in halves:
        half.acquire(timeout=0)  # the two halves do not overlap
    with pytest.raises(SlotsBusy):
        QueueOwnership(tmp_path, 2, 3).acquire(timeout=0)
    for half in halves:
        half.release()


def test_acquire_waits_for_a_predecessor_and_takes_over_when_it_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gateway.ownership import QueueOwnership;"
         f" QueueOwnership({str(tmp_path)!r}, 0, 2).acquire(); print('held', flush=True);"
         " time.sleep(60)"], env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = QueueOwnership(tmp_path, 0, 2)
        with pytest.raises(SlotsBusy, match=f"pid {holder.pid}"):
            mine.acquire(timeout=0.3)
        QueueOwnership(tmp_path, 1, 2).acquire(timeout=0)  # the other half is free
        killed_at = []

        def sleep(seconds: float) -> None:
            if not killed_at:
                holder.send_signal(signal.SIGKILL)  # the kernel drops its locks
                holder.wait(10)
                killed_at.append(time.monotonic())
            time.sleep(seconds)

        mine.acquire(timeout=30, sleep=sleep)
        assert mine.held and killed_at
    finally:
        holder.kill()
        holder.wait(10)


def _envelope(qid: str) -> Envelope:
    return Envelope(queue_id=qid, sender="a@corp.example", recipients=("b@example.net",),
                    received_at=time.time())


@pytest_twisted.ensureDeferred
async def test_a_spool_scan_sees_and_cleans_only_its_own_slots(tmp_path: Path) -> None:
    pool = ThreadPool(1, 2, "test-spool")
    pool.start()
    try:
        owners = [QueueOwnership(tmp_path, i, 2) for i in (0, 1)]
        spools = [Spool(tmp_path, reactor, pool, o) for o in owners]
        spools[0].open()
        ids: dict[int, list[str]] = {0: [], 1: []}
        for i, spool in enumerate(spools):
            for _ in range(5):
                qid = spool.new_id()
                await spool.submit(_envelope(qid), b"Subject: x\r\n\r\nx\r\n")
                ids[i].append(qid)
        # Another worker's file being written, and its leftover state, must stay.
        (tmp_path / "tmp" / f"{ids[1][0]}.999.0").write_bytes(b"half")
        (tmp_path / "state" / f"{spools[1].new_id()}.json").write_text("{}")
        mine_leftover = tmp_path / "tmp" / f"{ids[0][0]}.999.0"
        mine_leftover.write_bytes(b"half")
        assert sorted(await spools[0].scan()) == sorted(ids[0])
        assert not mine_leftover.exists()
        assert (tmp_path / "tmp" / f"{ids[1][0]}.999.0").exists()
        assert len(list((tmp_path / "state").glob("*.json"))) == 1
        assert sorted(await spools[1].scan()) == sorted(ids[1])
        assert sorted(await Spool(tmp_path, reactor, pool).scan()) == sorted(ids[0] + ids[1])
    finally:
        pool.stop()


def _parse(text: str):
    import tomllib
    return parse_config(tomllib.loads(text + '\n[[smarthosts]]\nhost = "relay.example"\n'
                                      '[[listeners]]\nendpoint = "tcp:2525"\nmode = "smtp"\n'),
                        base_dir=Path("/nonexistent"), environ={})


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse("").service.workers == 1
    assert _parse("[service]\nworkers = 4").service.workers == 4
    monkeypatch.setattr(config_ops, "cpu_count", lambda: 6)
    assert _parse('[service]\nworkers = "auto"').service.workers == 6
    monkeypatch.setattr(config_ops, "cpu_count", lambda: 200)
    assert _parse('[service]\nworkers = "auto"').service.workers == 64
    for bad in ("0", "65", '"many"', "true", "1.5"):
        with pytest.raises(ConfigError, match=r"^service\.workers: must be 1\.\.64 or"):
            _parse(f"[service]\nworkers = {bad}")


def test_several_workers_need_redis_for_rate_limit_rules() -> None:
    rules = ('[[ratelimit.rules]]\nkey = "user"\ndimension = "messages"\nwindow = "1h"\n'
             'limit = 100\n')
    assert _parse("[service]\nworkers = 1\n" + rules).service.workers == 1
    with pytest.raises(ConfigError, match=r"^service\.workers: 2 workers would each count"):
        _parse("[service]\nworkers = 2\n" + rules)
    both = _parse('[service]\nworkers = 2\n[ratelimit]\nredis = "redis://127.0.0.1:6379/0"\n'
                  + rules)
    assert both.service.workers == 2


def test_each_worker_takes_its_share_of_the_per_process_caps() -> None:
    config = _parse("[service]\nworkers = 3\n[limits]\nmax_connections = 100\n"
                    "max_connections_per_ip = 50\n[queue]\nconcurrency = 20\n"
                    "[relay]\nmax_connections_per_host = 10\nmessages_per_second = 30\n"
                    "[ratelimit]\noutbound_messages_per_second = 9.0\noutbound_connections = 4")
    share = worker_share(config)
    assert (share.limits.max_connections, share.limits.max_connections_per_ip) == (34, 34)
    assert share.queue.concurrency == 7
    assert share.relay.max_connections_per_host == 4
    assert share.relay.messages_per_second == 10.0
    assert (share.ratelimit.outbound_messages_per_second,
            share.ratelimit.outbound_connections) == (3.0, 2)
    assert share.relay.messages_per_second * 3 == config.relay.messages_per_second
    one = default_config()
    assert worker_share(one) is one
    tiny = replace(config, queue=replace(config.queue, concurrency=1))
    assert worker_share(tiny).queue.concurrency == 1  # never 0


def test_the_supervisor_merges_worker_metrics_with_a_worker_label() -> None:
    text = """# HELP itpison_gateway_messages_accepted_total Messages accepted
# TYPE itpison_gateway_messages_accepted_total counter
itpison_gateway_messages_accepted_total {n}
# HELP itpison_gateway_delivery_attempts_total Attempts
# TYPE itpison_gateway_delivery_attempts_total counter
itpison_gateway_delivery_attempts_total{{smarthost="a:465",outcome="ok"}} {n}
"""
    families = {f.name: f for f in merge({0: text.format(n=3), 1: text.format(n=5)})}
    accepted = families["itpison_gateway_messages_accepted"]
    assert {(s.labels["worker"], s.value) for s in accepted.samples
            if s.name.endswith("_total")} == {("0", 3.0), ("1", 5.0)}
    attempts = families["itpison_gateway_delivery_attempts"].samples
    assert {tuple(sorted(s.labels.items())) for s in attempts} == {
        (("outcome", "ok"), ("smarthost", "a:465"), ("worker", "0")),
        (("outcome", "ok"), ("smarthost", "a:465"), ("worker", "1"))}


def test_a_worker_leaves_the_spool_census_to_its_supervisor(tmp_path: Path) -> None:
    class Gateway:
        class spool:
            root = tmp_path

    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "Q1").write_bytes(b"x")
    names = [f.name for f in GatewayCollector(Gateway, census=True).collect()]
    assert names == ["itpison_gateway_queue_messages", "itpison_gateway_queue_oldest_age_seconds"]
    assert list(GatewayCollector(Gateway, census=False).collect()) == []
