"""Process-tree statistics from /proc (Linux): CPU time, peak RSS, sampled RSS/PSS.

A server is measured as the tree under one root pid (the twistd process for the gateway;
the master process for Postfix, whose smtpd/cleanup/qmgr/smtp children come and go).
CPU of the tree = the root's own and reaped children's time + every live descendant's.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # fields from 3 (state) on


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime (reaped children included), in seconds."""
    fields = _stat_fields(pid)
    return sum(int(x) for x in fields[11:15]) / TICK


def cpu_user_sys(pid: int) -> tuple[float, float]:
    """(user, system) seconds of the process, reaped children included."""
    f = [int(x) for x in _stat_fields(pid)[11:15]]
    return (f[0] + f[2]) / TICK, (f[1] + f[3]) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread, keyed "<tid> <name>"."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        name = data[data.index("(") + 1:data.rindex(")")]
        fields = data[data.rindex(")") + 2:].split()
        out[f"{tid} {name}"] = round((int(fields[11]) + int(fields[12])) / TICK, 2)
    return out


def schedstat(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread."""
    with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as f:
        run_ns, wait_ns, _slices = (int(x) for x in f.read().split())
    return run_ns / 1e9, wait_ns / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting for I/O) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # up to steal; minus idle, iowait


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int) -> float:
    total = cpu_seconds(root)
    for pid in descendants(root):
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # exited between the scan and now: its time moves to its parent
    return total


def status_kb(pid: int, key: str) -> int:
    """A "kB" field of /proc/<pid>/status (VmHWM, VmRSS), 0 if missing."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_hwm_kb(root: int) -> int:
    """Sum of VmHWM of the root and its live descendants."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            total += status_kb(pid, "VmHWM")
        except OSError:
            pass
    return total


@dataclass
class MemoryPeak:
    rss_kb: int = 0  # the largest sum of VmRSS over the tree seen in a sample
    pss_kb: int = 0  # the largest sum of Pss (shared pages divided among sharers)
    processes: int = 0  # the most processes seen in the tree at once
    samples: int = 0


class MemorySampler:
    """Samples the tree's memory every ``interval`` seconds in a thread until stopped."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.interval = interval
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> MemoryPeak:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss = pss = count = 0
        try:
            pids = [self.root, *descendants(self.root)]
        except OSError:
            return
        for pid in pids:
            try:
                rss += status_kb(pid, "VmRSS")
                pss += pss_kb(pid)
                count += 1
            except OSError:
                pass
        peak = self.peak
        peak.rss_kb, peak.pss_kb = max(peak.rss_kb, rss), max(peak.pss_kb, pss)
        peak.processes = max(peak.processes, count)
        peak.samples += 1
