"""The supervisor's decisions, in memory with a Clock: restart backoff, the watchdog,
readiness and reload as systemd sees them.  (tests/test_workers.py runs the real thing.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.config import load_config
from gateway.control import ControlError
from gateway.fanout import FanoutControl
from gateway.ownership import QueueOwnership, owner_of
from gateway.supervisor import RESTART_MAX, Supervisor, WorkerProcess
from gateway.supervisor_web import ready
from twistdrig import gateway_toml


class Notes:
    """A Notifier that records what systemd would get."""

    enabled = True

    def __init__(self, watchdog_interval: float | None = None) -> None:
        self.watchdog_interval = watchdog_interval
        self.sent: list[dict] = []

    def notify(self, **state) -> bool:
        self.sent.append(state)
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        pass


class Worker(WorkerProcess):
    def __init__(self, supervisor: Supervisor, index: int, started: float) -> None:
        super().__init__(supervisor, index, started)
        self.signals: list[str] = []
        self.pid = 1000 + index

    def signal(self, name: str) -> None:
        self.signals.append(name)


@pytest.fixture
def rig(tmp_path: Path):
    conf = gateway_toml(tmp_path, extra="[service]\nworkers = 2")
    clock = Clock()
    notes = Notes(watchdog_interval=10.0)
    sup = Supervisor(load_config(conf), clock, notes)
    spawned: list[tuple[int, float]] = []

    def spawn(index: int) -> None:
        spawned.append((index, clock.seconds()))
        sup.workers[index] = Worker(sup, index, clock.seconds())

    sup._spawn = spawn
    for index in range(2):
        spawn(index)
    spawned.clear()
    return sup, clock, notes, spawned, conf


def die(sup: Supervisor, index: int, how: Failure | None = None) -> None:
    worker = sup.workers[index]
    sup.worker_ended(worker, how or Failure(ProcessTerminated(signal=9)))


def test_a_dead_worker_restarts_with_a_growing_backoff_reset_by_a_long_run(rig) -> None:
    sup, clock, notes, spawned, _ = rig
    delays = []
    for _ in range(8):
        died_at = clock.seconds()
        die(sup, 1)
        assert sup.workers[1] is None
        delays.append(sup._respawns[1].getTime() - died_at)
        clock.advance(delays[-1] - 0.01)
        assert not spawned
        clock.advance(0.01)
        index, at = spawned.pop()
        assert index == 1 and at == pytest.approx(died_at + delays[-1])
        clock.advance(1)  # each new one dies a second after it started
    assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
    assert sup.restarts == 8
    clock.advance(120)  # this one ran for two minutes: the next restart is quick again
    died_at = clock.seconds()
    die(sup, 1)
    clock.advance(0.5)
    assert [(i, pytest.approx(at)) for i, at in spawned] == [(1, died_at + 0.5)]  # not 0


def test_no_restart_while_stopping_and_the_stop_waits_for_every_worker(rig) -> None:
    sup, clock, notes, spawned, _ = rig
    sup.running = True
    d = sup.stopService()
    assert {"STOPPING": 1} in notes.sent
    assert [w.signals for w in sup.workers.values()] == [["TERM"], ["TERM"]]
    die(sup, 0, Failure(ProcessDone(0)))
    assert not d.called
    die(sup, 1, Failure(ProcessDone(0)))
    clock.advance(RESTART_MAX + 1)
    assert spawned == []
    assert d.called


def test_a_worker_that_ignores_sigterm_is_killed_after_the_bound(rig) -> None:
    sup, clock, notes, spawned, _ = rig
    sup.running = True
    d = sup.stopService()
    die(sup, 0, Failure(ProcessDone(0)))
    clock.advance(sup.config.service.stop_timeout + 20 + 0.1)
    assert sup.workers[1].signals == ["TERM", "KILL"]
    die(sup, 1)
    assert d.called


def test_ready_once_every_worker_is_ready_and_after_each_reload(rig) -> None:
    sup, clock, notes, spawned, conf = rig
    w0, w1 = sup.workers[0], sup.workers[1]
    sup.worker_said(w0, {"READY": 1, "STATUS": "x"})
    assert not any("READY" in n for n in notes.sent)
    sup.worker_said(w1, {"READY": 1, "STATUS": "x"})
    assert [n for n in notes.sent if "READY" in n] == [
        {"READY": 1, "STATUS": "2 of 2 workers ready; accepting on 0 listeners"}]
    notes.sent.clear()
    assert sup.reload()
    assert notes.sent == [{"RELOADING": 1}]
    assert (w0.signals, w1.signals) == (["HUP"], ["HUP"])
    sup.worker_said(w0, {"RELOADING": 1})
    sup.worker_said(w0, {"READY": 1})
    assert len(notes.sent) == 1  # still waiting for worker 1
    sup.worker_said(w1, {"READY": 1})
    assert "READY" in notes.sent[-1]
    # A file that does not load is refused here: no worker is signalled.
    conf.write_text(conf.read_text().replace("port = 9", "port = 0"))
    assert not sup.reload()
    assert (w0.signals, w1.signals) == (["HUP"], ["HUP"])
    assert "refused" in notes.sent[-1]["STATUS"]


def test_the_watchdog_kills_a_silent_worker_and_pings_for_the_node(rig) -> None:
    sup, clock, notes, spawned, _ = rig
    w0, w1 = sup.workers[0], sup.workers[1]
    clock.advance(8)
    sup.worker_said(w0, {"WATCHDOG": 1})
    clock.advance(4)  # worker 1 silent for 12 s > 10 s; worker 0 for 4 s
    sup._watch(10.0)
    assert (w0.signals, w1.signals) == ([], ["KILL"])
    assert notes.sent[-1] == {"WATCHDOG": 1}
    # A status line from a worker that has been replaced meanwhile changes nothing.
    die(sup, 1)
    sup.worker_said(w1, {"READY": 1})
    assert sup.workers[1] is None


@pytest_twisted.ensureDeferred
async def test_queue_commands_and_readiness_say_which_worker_does_not_answer(tmp_path) -> None:
    """No worker control socket answers (both workers down): changes report the worker
    per message, a flush of everything fails naming it, reads still work, and /readyz
    is 503 with one line per worker."""
    state = tmp_path / "state"
    (state / "workers").mkdir(parents=True)
    pool = ThreadPool(1, 2, "test-fanout")
    pool.start()
    try:
        fanout = FanoutControl(state, 2, reactor, pool)
        ids = [QueueOwnership(tmp_path, i, 2).new_id() for i in (0, 1)]  # one per worker
        assert [owner_of(q, 2) for q in ids] == [0, 1]
        result = await fanout.run({"command": "hold", "ids": ids})
        for index, qid in enumerate(ids):
            assert result[qid].startswith(f"failed: worker {index} is not answering")
        with pytest.raises(ControlError, match="^worker 0: "):
            await fanout.run({"command": "flush"})
        assert await fanout.run({"command": "list"}) == []

        class Node:
            pass

        node = Node()
        node.reactor, node.state_dir, node.count, node.stopping = reactor, state, 2, False
        code, _, body = await ready(node)
        assert code == 503
        assert body.decode().splitlines() == ["worker 0: not running or not answering",
                                              "worker 1: not running or not answering"]
    finally:
        pool.stop()
