"""Which queued messages this process may deliver: queue slots held by ``flock``.

Every queue id falls in one of ``SLOTS`` slots (a CRC of the id).  A process delivers,
changes and cleans up only the messages of the slots it holds, and it holds a slot by an
exclusive ``flock`` on ``<spool>/slots/NN.lock`` for as long as it runs.  Worker ``i`` of
``n`` holds the slots ``s`` with ``s % n == i``; a single process holds them all.

Why locks and not just arithmetic: two processes must never deliver the same message,
even when they do not agree on ``n`` (an old worker still draining after its supervisor
died, while a new generation with another worker count starts), or when an admin starts a
second gateway on the same state directory.  The kernel drops a dead process's locks, so
a restarted worker takes over its predecessor's mail without any cleanup.

Ids of new messages (accepted mail, bounces) are drawn until they fall in a held slot, so
the process that accepts a message is also the one that delivers it, from memory.
"""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger

from gateway.envelope import new_queue_id

log = Logger(namespace="gateway.ownership")

SLOTS = 64  # the most workers a spool can be shared by
SLOT_DIR = "slots"


class SlotsBusy(Exception):
    """Another live process holds slots this one needs."""


def slot_of(qid: str) -> int:
    return zlib.crc32(qid.encode("ascii", "replace")) % SLOTS


def slots_for(index: int, count: int) -> frozenset[int]:
    if not 1 <= count <= SLOTS or not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}: need 0 <= index < count <= {SLOTS}")
    return frozenset(s for s in range(SLOTS) if s % count == index)


def owner_of(qid: str, count: int) -> int:
    """The worker index (of ``count``) whose slots hold ``qid``."""
    return slot_of(qid) % count


class QueueOwnership:
    """The slots of worker ``index`` of ``count`` under ``spool_root``.

    ``acquire`` takes their locks (synchronously, at start); ``owns`` and ``new_id`` may be
    called from any thread; ``release`` drops the locks (at stop, or by process exit)."""

    def __init__(self, spool_root: Path, index: int = 0, count: int = 1) -> None:
        self.root = Path(spool_root) / SLOT_DIR
        self.index = index
        self.count = count
        self.slots = slots_for(index, count)
        self._fds: dict[int, int] = {}

    @property
    def held(self) -> bool:
        return len(self._fds) == len(self.slots)

    def owns(self, qid: str) -> bool:
        return slot_of(qid) in self.slots

    def new_id(self, now: float | None = None) -> str:
        while True:
            qid = new_queue_id(now)
            if slot_of(qid) in self.slots:
                return qid

    def acquire(self, timeout: float = 0.0, sleep: Callable[[float], object] = time.sleep,
                clock: Callable[[], float] = time.monotonic) -> None:
        """Lock every slot, waiting up to ``timeout`` seconds for slots another process
        holds (a predecessor still draining).  Raises SlotsBusy naming the holders."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        deadline = clock() + timeout
        waited = False
        while True:
            busy = self._try_all()
            if not busy:
                if waited:
                    log.info("queue slots free again; delivering this worker's mail")
                return
            holders = sorted({self._holder(s) for s in busy})
            if clock() >= deadline:
                self.release()
                raise SlotsBusy(f"{len(busy)} queue slots in {self.root} are held by another"
                                f" gateway process (pid {', '.join(holders)}); one spool"
                                " cannot be served by two gateways")
            if not waited:
                log.warn("waiting up to {timeout}s for {n} queue slots held by pid {pids}",
                         timeout=timeout, n=len(busy), pids=", ".join(holders))
                waited = True
            sleep(0.1)

    def _try_all(self) -> list[int]:
        busy = []
        for slot in sorted(self.slots - self._fds.keys()):
            path = self.root / f"{slot:02d}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                busy.append(slot)
                continue
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above
            self._fds[slot] = fd
        return busy

    def _holder(self, slot: int) -> str:
        try:
            return (self.root / f"{slot:02d}.lock").read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)  # closing the only descriptor drops the flock
